"""Shared pieces of the evaluation tasks: examples, the task base class, compressed generation and haystack text."""

from __future__ import annotations

import bisect
import contextlib
import re
import time
from dataclasses import dataclass, field
from typing import Any

import torch

QUERY_AWARE = "query-aware"
QUESTION_AGNOSTIC = "question-agnostic"
STREAMING = "streaming"
COMPRESSION_MODES = (QUERY_AWARE, QUESTION_AGNOSTIC)


@dataclass
class Example:
    """One scored item: ``prompt[:split]`` is the compressible context, ``prompt[split:]`` the question part."""

    id: str
    prompt: str
    split: int
    refs: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def context(self) -> str:
        return self.prompt[: self.split]

    @property
    def query(self) -> str:
        return self.prompt[self.split :]


class Task:
    """A generation task: builds examples, generates inside the compressed cache and scores the prediction."""

    name: str = ""
    metrics: tuple[str, ...] = ("score",)  # per-example fields averaged into the summary
    primary: str = "score"
    max_new_tokens: int = 32
    stop_strings: tuple[str, ...] = ()
    modes: tuple[str, ...] = COMPRESSION_MODES
    #: ``evaluate`` can continue a cache forked from a shared context forward (``runner.run_shared``)
    shares_prefill: bool = True

    def settings(self) -> dict[str, Any]:
        """Everything that changes the examples or the scores (recorded, and checked on resume)."""
        return {"max_new_tokens": self.max_new_tokens}

    def required_data(self) -> tuple[str, ...]:
        """Names of the ``crushkv.data.DATASETS`` the examples are built from (installed before the model loads);
        empty when the task was given its text or items directly."""
        return ()

    def max_positions(self) -> int | None:
        """The most positions one example needs (prompt + generation), when known before tokenizing."""
        return None

    def examples(self, tokenizer: Any) -> list[Example]:
        raise NotImplementedError

    def score(self, prediction: str, example: Example) -> dict[str, float]:
        raise NotImplementedError

    def postprocess(self, text: str) -> str:
        """Cut the decoded continuation at the first stop string."""
        return truncate_at(text, self.stop_strings)

    def evaluate(
        self, model: Any, tokenizer: Any, example: Example, policy: Any, mode: str, prefilled: Any = None
    ) -> dict[str, Any]:
        """Run one example; returns the JSONL record (without run-level fields). ``prefilled``: see
        ``generate_compressed``."""
        gen = generate_compressed(
            model,
            tokenizer,
            example.context,
            example.query,
            policy,
            mode,
            max_new_tokens=int(example.meta.get("max_new_tokens", self.max_new_tokens)),
            stop_strings=list(self.stop_strings),
            prefilled=prefilled,
        )
        return self.record(example, gen)

    def record(self, example: Example, gen: dict[str, Any]) -> dict[str, Any]:
        """The JSONL record of ``example`` from one generation's fields (its ``text`` becomes the prediction)."""
        prediction = self.postprocess(gen.pop("text"))
        record = {"id": example.id, "prediction": prediction, "refs": example.refs, **example.meta}
        record.update(self.score(prediction, example))
        record.update(gen)
        return record

    def evaluate_forks(
        self, model: Any, tokenizer: Any, example: Example, policies: list[Any], caches: list[Any], shared: Any
    ) -> list[dict[str, Any]]:
        """Question-agnostic records of ``example`` for every policy, continuing each from its fork of one shared
        context forward (``caches``, ``shared``: see ``generate_compressed``'s ``prefilled``) and decoding the forks
        together (``generate_forks``). A task with its own :meth:`evaluate` runs them one by one."""
        if type(self).evaluate is not Task.evaluate:
            return [
                self.evaluate(model, tokenizer, example, policy, QUESTION_AGNOSTIC, prefilled=(cache, shared))
                for policy, cache in zip(policies, caches, strict=True)
            ]
        for policy, cache in zip(policies, caches, strict=True):
            if getattr(cache.policy, "spec", None) != getattr(policy, "spec", policy):
                raise ValueError(f"the prefilled cache was made for {cache.policy.spec!r}, not {policy!r}")
        gens = generate_forks(
            model,
            tokenizer,
            example.context,
            example.query,
            caches,
            shared,
            max_new_tokens=int(example.meta.get("max_new_tokens", self.max_new_tokens)),
            stop_strings=list(self.stop_strings),
        )
        return [self.record(example, gen) for gen in gens]

    def evaluate_batch(
        self, model: Any, tokenizer: Any, examples: list[Example], policy: Any, mode: str
    ) -> list[dict[str, Any]]:
        """Run several examples in one left-padded batch (query-aware generation tasks only).

        Tasks that override :meth:`evaluate`, question-agnostic runs and single examples are run one by one.
        Each row is compressed on its own (padding is never kept, never a sink, never a KVCrush representative),
        so a batch applies the same policy per example as batch size 1; greedy results can still differ where
        two logits tie within float rounding, since batched matmuls round differently.
        """
        own_evaluate = type(self).evaluate is not Task.evaluate
        if len(examples) == 1 or own_evaluate or mode != QUERY_AWARE:
            return [self.evaluate(model, tokenizer, ex, policy, mode) for ex in examples]
        gens = generate_compressed_batch(
            model,
            tokenizer,
            [(ex.context, ex.query) for ex in examples],
            policy,
            max_new_tokens=max(int(ex.meta.get("max_new_tokens", self.max_new_tokens)) for ex in examples),
            stop_strings=list(self.stop_strings),
        )
        return [self.record(ex, gen) for ex, gen in zip(examples, gens, strict=True)]

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, float]:
        """Summary metrics: the mean of each metric over the records."""
        out: dict[str, float] = {}
        for metric in self.metrics:
            values = [float(r[metric]) for r in records if metric in r]
            if values:
                out[metric] = sum(values) / len(values)
        return out


def task_means(records: list[dict[str, Any]], subtasks: tuple[str, ...]) -> dict[str, float]:
    """RULER's summary: the mean ``score`` per sub-task and per length (``L<n>``), and ``score`` = the average over
    sub-tasks (each task weighs the same, however many examples it has)."""
    out: dict[str, float] = {}
    for group in ("subtask", "length"):
        buckets: dict[Any, list[float]] = {}
        for r in records:
            buckets.setdefault(r[group], []).append(float(r["score"]))
        for key, values in buckets.items():
            out[f"L{key}" if group == "length" else str(key)] = sum(values) / len(values)
    per_task = [out[t] for t in subtasks if t in out]
    if per_task:
        out["score"] = sum(per_task) / len(per_task)
    return out


def truncate_at(text: str, stops: Any) -> str:
    """Return ``text`` up to the earliest occurrence of any stop string."""
    cut = len(text)
    for stop in stops:
        if stop:
            idx = text.find(stop)
            if idx != -1:
                cut = min(cut, idx)
    return text[:cut]


# ----------------------------------------------------------------------------------------------------------- generation


class _TokenClock:
    """A minimal generate() streamer that timestamps the first generated token."""

    def __init__(self) -> None:
        self.calls = 0
        self.first_token_at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 2 and self.first_token_at is None:  # call 1 is the prompt
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        pass


def encode_parts(tokenizer: Any, context: str, query: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize context (with special tokens unless the text already has BOS) and query separately.

    Tokenizing the two parts separately guarantees the context ids are an exact prefix of the full prompt ids,
    so question-agnostic and query-aware runs see the same tokens.
    """
    bos = getattr(tokenizer, "bos_token", None)
    add_special = not (bos and context.startswith(bos))
    ctx = tokenizer(context, add_special_tokens=add_special, return_tensors="pt").input_ids
    qry = tokenizer(query, add_special_tokens=False, return_tensors="pt").input_ids
    return ctx, qry


def num_layers(model: Any) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.num_hidden_layers)


def cache_stats(cache: Any, n_layers: int) -> dict[str, Any]:
    """Kept tokens (mean over layers, batch rows and heads; min/max over them), bytes held and logical length of a
    crushkv cache. Per-head budgets (Ada-KV) make the heads' counts differ: the mean is what the bytes follow."""
    stats: dict[str, Any] = {}
    kept: list[float] = []
    lo, hi = None, None
    compressed = set(getattr(cache, "compressed_layers", ()))
    for layer in range(n_layers):
        try:
            if layer in compressed:
                counts = cache.kept_counts(layer).float()
            else:
                counts = torch.tensor([float(cache.kept_positions(layer).shape[-1])])
        except Exception:  # layer without a cache entry (e.g. nothing stored yet)
            continue
        if counts.numel() == 0:
            continue
        kept.append(float(counts.mean()))
        lo = int(counts.min()) if lo is None else min(lo, int(counts.min()))
        hi = int(counts.max()) if hi is None else max(hi, int(counts.max()))
    if kept:
        stats.update(kept_tokens=sum(kept) / len(kept), kept_min=lo, kept_max=hi)
    for key, fn in (("cache_bytes", "nbytes"), ("seq_len", "get_seq_length")):
        with contextlib.suppress(Exception):
            stats[key] = int(getattr(cache, fn)())
    with contextlib.suppress(Exception):  # the deployment norm: accuracy per byte is compared at 16 bits
        stats["cache_bytes_16"] = int(cache.nbytes(float_bytes=2))
    return stats


def greedy_kwargs(tokenizer: Any) -> dict[str, Any]:
    """Greedy decoding, silencing sampling defaults that instruct models ship in their generation config."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None, "pad_token_id": pad}


def compress_ctx(model: Any, policy: Any, cache: Any = None, tokenizer: Any = None) -> Any:
    """`crushkv.compress(model, policy, cache=, tokenizer=)` (imported lazily so scoring code works without the
    core)."""
    from crushkv.api import compress

    return compress(model, policy, cache=cache, tokenizer=tokenizer)


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """`crushkv.cache_kwargs(model, cache)`: the cache argument under this transformers version's name (lazy import)."""
    from crushkv.api import cache_kwargs as named

    return named(model, cache)


@torch.inference_mode()
def generate_compressed(
    model: Any,
    tokenizer: Any,
    context: str,
    query: str,
    policy: Any,
    mode: str,
    max_new_tokens: int,
    stop_strings: list[str] | None = None,
    prefilled: tuple[Any, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Greedy generation with a compressed cache.

    ``question-agnostic``: the context is prefilled (and compressed) first, then the question is fed;
    ``query-aware``: one generate call over context + question.
    ``prefilled``: ``(cache, shared)``, a cache that already holds the compressed context (question-agnostic; one of
    ``crushkv.fork.prefill_forks``' caches, made with this ``policy``) and the cost of the forward it came from
    (``prefill_s``, ``prefill_forwards``, ``forks``): generation continues from it instead of running the context.
    Returns ``text`` (raw continuation), token counts, cache statistics and timings. Latencies count the context
    forward in full even when it was shared (what one user running this policy alone waits); ``forks`` says by how
    many caches its cost was shared.
    """
    if mode not in COMPRESSION_MODES:
        raise ValueError(f"unknown compression mode {mode!r}; expected one of {COMPRESSION_MODES}")
    if prefilled is not None and mode != QUESTION_AGNOSTIC:
        raise ValueError("a prefilled cache holds the compressed context: question-agnostic generation only")
    ctx_ids, q_ids = encode_parts(tokenizer, context, query)
    full = torch.cat([ctx_ids, q_ids], dim=1).to(model.device)
    mask = torch.ones_like(full)
    kwargs = greedy_kwargs(tokenizer)
    if stop_strings:
        kwargs.update(stop_strings=stop_strings, tokenizer=tokenizer)
    clock = _TokenClock()
    out: dict[str, Any] = {"context_tokens": ctx_ids.shape[1], "prompt_tokens": full.shape[1]}
    n_layers = num_layers(model)
    if prefilled is not None:
        cache, shared = prefilled
        if getattr(cache.policy, "spec", None) != getattr(policy, "spec", policy):
            raise ValueError(f"the prefilled cache was made for {cache.policy.spec!r}, not {policy!r}")
        out.update(shared)
        out.update({f"{k}_after_context": v for k, v in cache_stats(cache, n_layers).items()})
        context = compress_ctx(model, policy, cache=cache)
        t0 = time.perf_counter() - shared["prefill_s"]
    else:
        context = compress_ctx(model, policy, tokenizer=tokenizer)
        t0 = time.perf_counter()
    with context as cache:
        cached = cache_kwargs(model, cache)
        if mode == QUESTION_AGNOSTIC and prefilled is None:
            n = ctx_ids.shape[1]
            model(full[:, :n], attention_mask=mask[:, :n], **cached, use_cache=True, logits_to_keep=1)
            out["prefill_s"] = time.perf_counter() - t0
            out.update({f"{k}_after_context": v for k, v in cache_stats(cache, n_layers).items()})
        seq = model.generate(
            full,
            attention_mask=mask,
            **cached,
            max_new_tokens=max_new_tokens,
            streamer=clock,
            **kwargs,
        )
        t1 = time.perf_counter()
        out.update(cache_stats(cache, n_layers))
    new = seq[0, full.shape[1] :]
    out["new_tokens"] = int(new.shape[0])
    out["time_s"] = t1 - t0
    if clock.first_token_at is not None:
        out["ttft_s"] = clock.first_token_at - t0
        if new.shape[0] > 1:
            out["decode_tok_s"] = (new.shape[0] - 1) / max(t1 - clock.first_token_at, 1e-9)
    out["text"] = tokenizer.decode(new, skip_special_tokens=True)
    return out


#: generation-config settings that add logits processors to greedy decoding: ``generate_forks`` runs its own greedy
#: loop (argmax, EOS and stop strings as ``generate`` applies them), so it refuses a model configured with any
PROCESSOR_SETTINGS = {
    "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "sequence_bias": (None,),
    "exponential_decay_length_penalty": (None,),
    "guidance_scale": (None, 1.0),
}


@torch.inference_mode()
def generate_forks(
    model: Any,
    tokenizer: Any,
    context: str,
    query: str,
    caches: list[Any],
    shared: dict[str, Any],
    max_new_tokens: int,
    stop_strings: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Greedy question-agnostic generation from several forks of one compressed context (``prefill_forks``'
    caches, any policies), decoded together as the rows of one batch (``crushkv.fork.StackedRows``).

    Each row's attention, statistics and eviction run in its own cache, as alone; the rows share the model's
    matmuls, so a row's logits equal its separate run's up to the rounding of a batched matmul. A row leaves the
    batch when it stops (EOS, a stop string as ``generate``'s ``StopStringCriteria`` sees it, or
    ``max_new_tokens``), so its cache ends as a separate run's does. Returns one dict per cache, as
    ``generate_compressed`` does; ``time_s``, ``ttft_s`` and ``decode_tok_s`` are the batch's (the wall time until
    the row stopped), ``decode_batch`` the number of rows that started.
    """
    from transformers import StopStringCriteria

    from crushkv.api import installed
    from crushkv.fork import StackedRows

    config = model.generation_config
    for name, plain in PROCESSOR_SETTINGS.items():
        if getattr(config, name, None) not in plain:
            raise ValueError(
                f"generate_forks decodes greedily without logits processors; this model's generation config sets "
                f"{name}={getattr(config, name)!r} (decode the forks one by one instead)"
            )
    ctx_ids, q_ids = encode_parts(tokenizer, context, query)
    n_layers = num_layers(model)
    outs: list[dict[str, Any]] = []
    for cache in caches:
        out = {"context_tokens": ctx_ids.shape[1], "prompt_tokens": ctx_ids.shape[1] + q_ids.shape[1], **shared}
        out.update({f"{k}_after_context": v for k, v in cache_stats(cache, n_layers).items()})
        out["decode_batch"] = len(caches)
        outs.append(out)
    eos = set(_as_list(getattr(config, "eos_token_id", None)))
    stop = StopStringCriteria(tokenizer, stop_strings) if stop_strings else None
    device = model.device
    prompt = torch.cat([ctx_ids, q_ids], dim=1).to(device)
    seqs = prompt.expand(len(caches), -1).clone()
    new: list[list[int]] = [[] for _ in caches]
    running = list(range(len(caches)))
    stack = StackedRows(caches)
    step_ids = q_ids.to(device).expand(len(caches), -1)
    t0 = time.perf_counter() - shared["prefill_s"]  # latencies count the shared context forward, as alone
    first_at = None
    with installed(model, stack):
        while running:
            width = seqs.shape[1]
            mask = torch.ones(len(running), width, dtype=torch.long, device=device)
            logits = model(step_ids, attention_mask=mask, **cache_kwargs(model, stack), use_cache=True,
                           logits_to_keep=1).logits[:, -1]  # fmt: skip
            tokens = logits.argmax(-1)
            now = time.perf_counter()
            first_at = now if first_at is None else first_at
            seqs = torch.cat([seqs, tokens[:, None]], dim=1)
            done = torch.zeros(len(running), dtype=torch.bool)
            if stop is not None:
                done |= stop(seqs, logits).cpu()
            keep = []
            for i, (row, token) in enumerate(zip(running, tokens.tolist(), strict=True)):
                new[row].append(token)
                if done[i] or token in eos or len(new[row]) >= max_new_tokens:
                    out = outs[row]
                    out.update(cache_stats(caches[row], n_layers))
                    out.update(new_tokens=len(new[row]), time_s=now - t0, ttft_s=first_at - t0)
                    if len(new[row]) > 1:
                        out["decode_tok_s"] = (len(new[row]) - 1) / max(now - first_at, 1e-9)
                else:
                    keep.append(i)
            if len(keep) < len(running):
                running = [running[i] for i in keep]
                if not running:
                    break
                seqs, tokens = seqs[keep], tokens[keep]
                stack.rows = [caches[row] for row in running]
            step_ids = tokens[:, None]
    for row, out in enumerate(outs):
        out["text"] = tokenizer.decode(new[row], skip_special_tokens=True)
    return outs


def _row_cache_stats(cache: Any, n_layers: int, row: int, rows: int) -> dict[str, Any]:
    """Kept (non-padding) tokens of one batch row over layers and heads; bytes are the batch's storage / rows."""
    kept: list[int] = []
    for layer in getattr(cache, "layers", [])[:n_layers]:
        valid = getattr(layer, "valid", None)
        if valid is not None:
            kept.extend(int(v) for v in valid[row].sum(-1).tolist())
    stats: dict[str, Any] = {}
    if kept:
        stats.update(kept_tokens=sum(kept) / len(kept), kept_min=min(kept), kept_max=max(kept))
    with contextlib.suppress(Exception):
        stats["cache_bytes"] = int(cache.nbytes()) // rows
    with contextlib.suppress(Exception):
        stats["cache_bytes_16"] = int(cache.nbytes(float_bytes=2)) // rows
    with contextlib.suppress(Exception):
        stats["seq_len"] = int(cache.get_seq_length())
    return stats


@torch.inference_mode()
def generate_compressed_batch(
    model: Any,
    tokenizer: Any,
    prompts: list[tuple[str, str]],
    policy: Any,
    max_new_tokens: int,
    stop_strings: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Query-aware greedy generation for several (context, question) prompts in one left-padded batch.

    Timings are the batch's: ``time_s`` is the batch wall time divided by the number of rows (amortised),
    ``ttft_s`` the batch prefill; ``batch_size`` is recorded with each row.
    """
    encoded = [torch.cat(encode_parts(tokenizer, c, q), dim=1)[0] for c, q in prompts]
    ctx_lens = [encode_parts(tokenizer, c, "")[0].shape[1] for c, _ in prompts]
    width = max(int(e.shape[0]) for e in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(encoded), width), int(pad), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, e in enumerate(encoded):
        ids[row, width - e.shape[0] :] = e
        mask[row, width - e.shape[0] :] = 1
    ids, mask = ids.to(model.device), mask.to(model.device)
    kwargs = greedy_kwargs(tokenizer)
    if stop_strings:
        kwargs.update(stop_strings=stop_strings, tokenizer=tokenizer)
    clock = _TokenClock()
    t0 = time.perf_counter()
    with compress_ctx(model, policy, tokenizer=tokenizer) as cache:
        seq = model.generate(
            ids,
            attention_mask=mask,
            **cache_kwargs(model, cache),
            max_new_tokens=max_new_tokens,
            streamer=clock,
            **kwargs,
        )
        t1 = time.perf_counter()
        n_layers = num_layers(model)
        stats = [_row_cache_stats(cache, n_layers, row, len(encoded)) for row in range(len(encoded))]
    eos = set(_as_list(getattr(model.generation_config, "eos_token_id", None)))
    out = []
    for row, e in enumerate(encoded):
        new = seq[row, width:].tolist()
        trailing = next((i for i, t in enumerate(reversed(new)) if t != pad), len(new))  # pads after the row stopped
        n_new = len(new) - trailing + (1 if trailing and int(pad) in eos else 0)  # count the EOS, as generate() does
        rec: dict[str, Any] = {"context_tokens": ctx_lens[row], "prompt_tokens": int(e.shape[0])}
        rec.update(stats[row])
        rec.update(new_tokens=n_new, time_s=(t1 - t0) / len(encoded), batch_size=len(encoded))
        if clock.first_token_at is not None:
            rec["ttft_s"] = clock.first_token_at - t0
            if n_new > 1:
                rec["decode_tok_s"] = (n_new - 1) / max(t1 - clock.first_token_at, 1e-9)
        rec["text"] = tokenizer.decode(seq[row, width:], skip_special_tokens=True)
        out.append(rec)
    return out


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


# ------------------------------------------------------------------------------------------------------------ prompting


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]], assistant_prefix: str = "") -> str:
    """Render a chat with the model's template, ending with the generation prompt (+ an answer prefix)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("--chat needs a tokenizer with a chat template")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + assistant_prefix


def split_at_last(prompt: str, marker: str) -> int:
    """Character index of the last occurrence of ``marker`` (where the question part starts)."""
    idx = prompt.rfind(marker)
    if idx < 0:
        raise ValueError(f"marker {marker!r} not in prompt")
    return idx


# ------------------------------------------------------------------------------------------------------------- haystack

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def sentence_boundaries(text: str) -> list[int]:
    """Sorted character offsets where a sentence starts (always includes 0 and len(text))."""
    cuts = {0, len(text)}
    cuts.update(m.end() for m in _SENTENCE_END.finditer(text))
    return sorted(cuts)


def boundary_at_depth(text: str, depth: float) -> int:
    """Sentence boundary at or just before ``depth`` (0..1) of the text; 1.0 is the very end."""
    bounds = sentence_boundaries(text)
    target = round(depth * len(text))
    return bounds[max(bisect.bisect_right(bounds, target) - 1, 0)]


def count_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def truncate_tokens(tokenizer: Any, text: str, n_tokens: int) -> str:
    """The longest prefix of ``text`` that is at most ``n_tokens`` tokens, cut at a sentence boundary."""
    if n_tokens <= 0:
        return ""
    head = text[: max(64, n_tokens * 12)]  # generous: > 12 chars per token is rare
    ids = tokenizer(head, add_special_tokens=False).input_ids
    if len(ids) <= n_tokens and len(head) == len(text):
        return text
    prefix = tokenizer.decode(ids[:n_tokens])
    # cut back to the last sentence boundary so the needle/question never splits a sentence
    cut = prefix.rstrip()
    bounds = [b for b in sentence_boundaries(cut) if b < len(cut)]
    last = bounds[-1] if len(bounds) > 1 else len(cut)
    return cut[:last].rstrip() if last > 0 else cut


def haystack(max_chars: int | None = None, offset: int = 0) -> str:
    """Paul Graham essays from ``crushkv.data`` (optionally a slice)."""
    from crushkv.data import haystack_text

    text = haystack_text()
    return text[offset:] if max_chars is None else text[offset : offset + max_chars]


def seeded_rng(seed: int, *parts: Any) -> Any:
    """A numpy Generator seeded from ``seed`` and a stable hash of ``parts`` (for per-cell randomness)."""
    import hashlib

    import numpy as np

    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))
