"""Streaming perplexity through the compressed cache."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest_eval import HAYSTACK, tiny_model, tiny_tokenizer
from crushkv.eval.ppl import PPLTask


@pytest.mark.parametrize(("chunk", "prefill"), [(1, 0), (5, 0), (3, 20)])
def test_full_cache_matches_one_forward(chunk: int, prefill: int) -> None:
    tok, model = tiny_tokenizer(), tiny_model()
    task = PPLTask(length=48, docs=1, chunk=chunk, prefill=prefill, text=HAYSTACK)
    task.progress = False
    ex = task.examples(tok)[0]
    rec = task.evaluate(model, tok, ex, "full", "streaming")
    ids = tok(ex.prompt, return_tensors="pt").input_ids[:, :48]
    with torch.no_grad():
        ref = F.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:]).item()
    assert rec["scored_tokens"] == 47 and rec["nll"] == pytest.approx(ref, abs=1e-4)
    assert rec["ppl"] == pytest.approx(math.exp(ref), rel=1e-3)


def test_compressed_cache_is_bounded() -> None:
    tok, model = tiny_tokenizer(), tiny_model()
    task = PPLTask(length=64, docs=2, chunk=1, text=HAYSTACK)
    task.progress = False
    examples = task.examples(tok)
    assert len(examples) == 2 and examples[0].prompt != examples[1].prompt
    assert examples[-1].prompt[-200:] in HAYSTACK[-2000:]  # held-out tail of the haystack
    recs = [task.evaluate(model, tok, ex, "streaming:budget=24", "streaming") for ex in examples]
    assert all(r["kept_max"] <= 24 and r["seq_len"] == 63 for r in recs)
    agg = task.aggregate(recs)
    assert agg["ppl"] == pytest.approx(
        math.exp(sum(r["nll_sum"] for r in recs) / sum(r["scored_tokens"] for r in recs))
    )


def test_bad_settings() -> None:
    with pytest.raises(ValueError):
        PPLTask(chunk=0)
    with pytest.raises(ValueError):
        PPLTask(length=10, prefill=10)
