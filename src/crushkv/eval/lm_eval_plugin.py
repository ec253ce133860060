"""lm-evaluation-harness model ``crushkv``: Hugging Face ``HFLM`` whose generations run inside ``crushkv.compress``.

lm-eval (``pip install lm-eval accelerate``) has no plugin discovery, so register the model before evaluating::

    from crushkv.eval.lm_eval_plugin import register
    import lm_eval
    register()
    lm_eval.simple_evaluate(model="crushkv", model_args={"pretrained": "smollm2-135m",
                            "policy": "h2o+kvcrush:budget=512,crush=384"}, tasks=["gsm8k"], limit=20)

or use the command line wrapper, which takes lm-eval's own arguments (``;`` stands for ``,`` inside the policy,
because lm-eval splits ``--model_args`` on commas)::

    python -m crushkv.eval.lm_eval_plugin run --model crushkv --tasks gsm8k --limit 20 \\
        --model_args "pretrained=smollm2-135m,policy=h2o+kvcrush:budget=512;crush=384,device=cpu"

Only generation requests (``generate_until``, e.g. gsm8k) are compressed, query-aware (the whole prompt is
compressed, question included). Log-likelihood requests score one forward pass, which compression cannot change.
``pretrained`` may be a crushkv catalog name, a local path or a hub id.
"""

from __future__ import annotations

import sys
from typing import Any

MODEL_NAME = "crushkv"
_CLASS: type | None = None


def _build_class() -> type:
    from lm_eval.models.huggingface import HFLM

    from crushkv.api import cache_kwargs, compress
    from crushkv.policies import parse_policy

    class CrushKVLM(HFLM):
        """HFLM that generates with a compressed KV cache (``policy`` = crushkv spec)."""

        def __init__(self, pretrained: Any = None, policy: str = "full", dtype: Any = "float32", **kwargs: Any):
            self.policy = parse_policy(str(policy).replace(";", ","))
            kwargs.setdefault("device", "cpu")
            if isinstance(pretrained, str) and _is_catalog_name(pretrained):
                from crushkv.models import load_model

                model, tokenizer = load_model(pretrained, dtype=dtype)
                kwargs.setdefault("tokenizer", tokenizer)
                pretrained = model
            elif isinstance(pretrained, str):
                kwargs["dtype"] = dtype
            super().__init__(pretrained=pretrained, **kwargs)

        def _model_generate(self, context: Any, max_length: int, stop: list[str], **generation_kwargs: Any) -> Any:
            with compress(self.model, self.policy) as cache:
                generation_kwargs.update(cache_kwargs(self.model, cache))
                return super()._model_generate(context, max_length, stop, **generation_kwargs)

    return CrushKVLM


def _is_catalog_name(name: str) -> bool:
    try:
        from crushkv.models import catalog_entry

        catalog_entry(name)
    except Exception:
        return False
    return True


def model_class() -> type:
    """The ``CrushKVLM`` class (imports lm_eval on first use)."""
    global _CLASS
    if _CLASS is None:
        _CLASS = _build_class()
    return _CLASS


def register(name: str = MODEL_NAME) -> type:
    """Register ``CrushKVLM`` with lm-eval under ``name`` (idempotent); returns the class."""
    from lm_eval.api import registry

    cls = model_class()
    if registry.MODEL_REGISTRY.get(name, None) is not cls:
        registry.register_model(name)(cls)
    return cls


def __getattr__(attr: str) -> Any:  # `from crushkv.eval.lm_eval_plugin import CrushKVLM` works lazily
    if attr == "CrushKVLM":
        return model_class()
    raise AttributeError(attr)


def main(argv: list[str] | None = None) -> int:
    """Register the model, then run lm-eval's command line with ``argv``."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        print("error: lm-eval is not installed: pip install lm-eval accelerate", file=sys.stderr)
        return 2
    register()
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
