"""Perplexity of held-out essay text scored through the compressed cache (StreamingLLM-style).

Each document is ``length`` tokens from the tail of the haystack (NIAH/RULER use the start). After an optional
``prefill`` of the first tokens in one forward, tokens are fed ``chunk`` at a time through the compressed cache and
the NLL of every next token is accumulated. ``chunk=1`` is exact streaming evaluation (every prediction sees the
cache as compressed up to that token); larger chunks are faster but tokens inside a chunk attend to each other
uncompressed.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from crushkv.eval.common import (
    STREAMING,
    Example,
    Task,
    cache_kwargs,
    cache_stats,
    compress_ctx,
    haystack,
    num_layers,
)

CHARS_PER_TOKEN = 10  # generous upper bound used to cut enough text per document


class PPLTask(Task):
    """Token-by-token perplexity with the compressed cache."""

    name = "ppl"
    metrics = ("nll", "ppl")
    primary = "ppl"
    modes = (STREAMING,)
    shares_prefill = False  # scores every position of a stream: no context to fork

    def __init__(
        self, length: int = 1024, docs: int = 2, chunk: int = 1, prefill: int = 0, text: str | None = None
    ) -> None:
        if docs < 1:
            raise ValueError(f"ppl needs at least one document, got docs={docs}")
        if length < 2:
            raise ValueError(f"ppl needs at least 2 tokens per document (one to predict), got length={length}")
        if chunk < 1:
            raise ValueError("chunk must be >= 1")
        if not 0 <= prefill < length:
            raise ValueError("prefill must be in [0, length)")
        self.length = length
        self.docs = docs
        self.chunk = chunk
        self.prefill = prefill
        self._text = text
        self.progress = True

    def required_data(self) -> tuple[str, ...]:
        return () if self._text is not None else ("haystack",)

    def max_positions(self) -> int:
        return self.length

    def settings(self) -> dict[str, Any]:
        return {
            "length": self.length,
            "docs": self.docs,
            "chunk": self.chunk,
            "prefill": self.prefill,
            "source": "tail of crushkv.data.haystack_text()",
        }

    def examples(self, tokenizer: Any) -> list[Example]:
        span = self.length * CHARS_PER_TOKEN
        text = self._text if self._text is not None else haystack()
        tail = text[-span * self.docs :] if len(text) > span * self.docs else text
        step = max(len(tail) // self.docs, 1)
        out = []
        for d in range(self.docs):
            piece = tail[d * step : (d + 1) * step]
            start = piece.find(". ") + 2 if ". " in piece[:500] else 0  # start on a sentence
            out.append(Example(id=f"ppl-{d}", prompt=piece[start:], split=0, refs=[], meta={"doc": d}))
        return out

    @torch.inference_mode()
    def evaluate(self, model: Any, tokenizer: Any, example: Example, policy: Any, mode: str) -> dict[str, Any]:
        ids = tokenizer(example.prompt, return_tensors="pt").input_ids[:, : self.length].to(model.device)
        total = ids.shape[1]
        nll, count = 0.0, 0
        t0 = time.perf_counter()
        with compress_ctx(model, policy) as cache:
            cached = cache_kwargs(model, cache)
            pos = 0
            if self.prefill > 0:  # one forward over the first tokens; its logits predict tokens 1..prefill
                n = min(self.prefill, total - 1)
                logits = model(ids[:, :n], **cached, use_cache=True).logits
                nll += F.cross_entropy(logits[0].float(), ids[0, 1 : n + 1], reduction="sum").item()
                count += n
                pos = n
            steps = range(pos, total - 1, self.chunk)
            for start in tqdm(steps, desc=f"{example.id} tokens", leave=False, disable=not self.progress):
                end = min(start + self.chunk, total - 1)
                logits = model(ids[:, start:end], **cached, use_cache=True).logits
                target = ids[0, start + 1 : end + 1]
                nll += F.cross_entropy(logits[0].float(), target, reduction="sum").item()
                count += int(target.shape[0])
            elapsed = time.perf_counter() - t0
            stats = cache_stats(cache, num_layers(model))
        return {
            "id": example.id,
            **example.meta,
            "tokens": total,
            "scored_tokens": count,
            "nll_sum": nll,
            "nll": nll / max(count, 1),
            "ppl": math.exp(nll / max(count, 1)),
            "time_s": elapsed,
            "tok_s": total / max(elapsed, 1e-9),
            **stats,
        }

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, float]:
        """Token-weighted NLL over all documents and its perplexity."""
        tokens = sum(int(r["scored_tokens"]) for r in records)
        if not tokens:
            return {}
        nll = sum(float(r["nll_sum"]) for r in records) / tokens
        return {"nll": nll, "ppl": math.exp(nll), "scored_tokens": float(tokens)}
