"""``crushkv.compress``: run a model with a compressed KV cache inside a ``with`` block."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator
from contextlib import contextmanager

from crushkv import attention
from crushkv.cache import CrushCache, text_config
from crushkv.layer_stack import DEFER_MAX_BYTES
from crushkv.policies import Policy, parse_policy
from crushkv.reconstruct import instruction_ids, reconstruct
from crushkv.rope import find_rope

#: ``config.model_type`` values whose attention modules crushkv has been checked against
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma3")


def attention_modules(model) -> list:
    """Attention modules of every decoder layer (those with a ``layer_idx``)."""
    modules = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")]
    if not modules:
        raise ValueError(f"{type(model).__name__}: no attention modules with a layer_idx found; unsupported model")
    return modules


def cache_kwargs(model, cache) -> dict[str, object]:
    """``{name: cache}`` for ``model(...)`` / ``model.generate(...)``: transformers >= 5.24 calls the argument ``cache``
    (``past_key_values`` is deprecated there), earlier 5.x versions ``past_key_values``."""
    return {_cache_argument(type(model)): cache}


@functools.lru_cache(maxsize=64)
def _cache_argument(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def check_supported(model) -> None:
    """Raise ``ValueError`` for a model family crushkv does not support."""
    config = text_config(model.config)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported model type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise ValueError("models with attention logit softcapping (e.g. Gemma2) are not supported")


@contextmanager
def compress(
    model,
    policy: str | Policy = "full",
    defer_bytes: int | None = None,
    *,
    cache: CrushCache | None = None,
    tokenizer=None,
) -> Iterator[CrushCache]:
    """Yield a ``CrushCache`` to pass as the cache (``cache=``, ``past_key_values=`` before transformers 5.24; see
    ``cache_kwargs``) to ``model(...)`` / ``model.generate(...)``.

    Inside the block the model uses crushkv's attention function (SDPA plus the statistics the policy needs);
    leaving the block restores the model's attention implementation. One block per model at a time: nesting is an
    error (the inner cache would silently replace the outer one). ``defer_bytes``: uncompressed prompt K/V the
    cache may hold back to cut several layers in one selection (default ``layer_stack.DEFER_MAX_BYTES`` = 16 MiB;
    0 cuts the prompt layer by layer, the lowest peak memory). ``cache``: continue a cache made earlier (one of
    ``crushkv.fork.prefill_forks``' caches) instead of starting an empty one; its policy is used. ``tokenizer``:
    needed by policies whose scoring feeds the model text (``kvzip``'s reconstruction instruction).

    >>> with crushkv.compress(model, "h2o+kvcrush:budget=512,crush=384") as cache:
    ...     out = model.generate(**inputs, **crushkv.cache_kwargs(model, cache), max_new_tokens=64)
    """
    if cache is None:
        policy = parse_policy(policy)
        if defer_bytes is not None and defer_bytes < 0:
            raise ValueError(f"defer_bytes must be >= 0, got {defer_bytes}")
        cache = new_cache(model, policy, defer_bytes, tokenizer)
    elif not isinstance(cache, CrushCache):
        raise TypeError(f"cache must be a CrushCache, got {type(cache).__name__}")
    with installed(model, cache):
        yield cache


def new_cache(model, policy: Policy, defer_bytes: int | None = None, tokenizer=None) -> CrushCache:
    """An empty ``CrushCache`` for ``model`` (checked supported) with its RoPE (and tokenizer) attached."""
    check_supported(model)
    cache = CrushCache(model.config, policy, DEFER_MAX_BYTES if defer_bytes is None else int(defer_bytes))
    cache.rope = find_rope(model)
    cache.tokenizer = tokenizer
    if policy.reconstructs:
        instruction_ids(tokenizer, policy.scorer().prompt)  # a missing tokenizer fails here, before any forward
    return cache


@contextmanager
def installed(model, cache) -> Iterator[None]:
    """crushkv's attention function on ``model``, routing its layers to ``cache`` (a ``CrushCache``, or
    ``crushkv.fork.FanOut`` for a shared prompt), for the duration of the block."""
    modules = attention_modules(model)
    if any(hasattr(m, attention.CACHE_ATTR) for m in modules):
        raise RuntimeError(
            "crushkv.compress is already active on this model: leave the outer `with` block first "
            "(one compressed cache per model at a time)"
        )
    attention.register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(attention.NAME)
    for module in modules:
        setattr(module, attention.CACHE_ATTR, cache)
    hook = None
    if isinstance(cache, CrushCache) and cache.policy.reconstructs:
        hook = model.register_forward_hook(_reconstruct_after_prompt, with_kwargs=True)
    cache.active = True
    try:
        yield
    finally:
        if hook is not None:
            hook.remove()
        cache.active = False
        for module in modules:
            if hasattr(module, attention.CACHE_ATTR):
                delattr(module, attention.CACHE_ATTR)
        model.set_attn_implementation(previous)


def _reconstruct_after_prompt(model, args, kwargs, output) -> None:
    """Forward hook of a ``reconstructs`` policy: once the prompt's forward returns, score it by reconstruction
    and cut (``crushkv.reconstruct``), before generation reads the cache again."""
    cache = next(getattr(m, attention.CACHE_ATTR) for m in attention_modules(model))
    if not cache.reconstruct_due:
        return
    cache.reconstruct_due = False
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    if input_ids is None:
        raise ValueError(f"{cache.policy.name} reconstructs the prompt from its token ids: pass input_ids")
    reconstruct(model, cache, input_ids, kwargs.get("attention_mask"))
