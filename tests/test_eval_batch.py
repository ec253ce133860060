"""Batched evaluation (left-padded rows) gives the per-example results of batch size 1."""

from __future__ import annotations

import pytest

from conftest_eval import GSM8K_ITEMS, tiny_model, tiny_tokenizer
from crushkv.eval.gsm8k import GSM8KTask

FIELDS = ("prediction", "strict", "flexible", "new_tokens", "prompt_tokens", "context_tokens", "kept_tokens")


@pytest.mark.parametrize("policy", ["full", "h2o:budget=64", "h2o+kvcrush:budget=64,crush=24,anchor=mean"])
def test_batch_matches_single(policy: str) -> None:
    task = GSM8KTask(items=GSM8K_ITEMS, max_new_tokens=6)
    tok, model = tiny_tokenizer(), tiny_model()
    examples = task.examples(tok)[:3]
    assert len({len(tok(e.context + e.query).input_ids) for e in examples}) > 1, "rows must need padding"
    single = [task.evaluate(model, tok, ex, policy, "query-aware") for ex in examples]
    batch = task.evaluate_batch(model, tok, examples, policy, "query-aware")
    assert [r["id"] for r in batch] == [e.id for e in examples]
    for one, many in zip(single, batch):
        for key in FIELDS:
            assert many[key] == one[key], (key, many[key], one[key])
        assert many["batch_size"] == 3
    if policy != "full":  # every row keeps exactly its budget of real tokens, padding never counts
        assert all(r["kept_min"] == r["kept_max"] == 64 for r in batch)


def test_question_agnostic_falls_back_to_single() -> None:
    task = GSM8KTask(items=GSM8K_ITEMS, max_new_tokens=4)
    tok, model = tiny_tokenizer(), tiny_model()
    examples = task.examples(tok)[:2]
    batch = task.evaluate_batch(model, tok, examples, "h2o:budget=64", "question-agnostic")
    assert all("batch_size" not in r for r in batch)
    assert [r["prediction"] for r in batch] == [
        task.evaluate(model, tok, ex, "h2o:budget=64", "question-agnostic")["prediction"] for ex in examples
    ]
