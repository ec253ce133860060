"""RULER-style tasks: scorers, example construction, aggregation."""

from __future__ import annotations

import pytest

from conftest_eval import HAYSTACK, tiny_tokenizer
from crushkv.eval.ruler_lite import SUBTASKS, RulerTask, insert_many, string_match_all, string_match_part


def test_string_match_all_and_part() -> None:
    refs = ["1234567", "7654321", "Alpha"]
    assert string_match_all("the numbers are 1234567 and alpha", refs) == pytest.approx(2 / 3)
    assert string_match_all("nothing", refs) == 0.0
    assert string_match_part("ALPHA only", refs) == 1.0
    assert string_match_part("beta", refs) == 0.0
    assert string_match_all("12345\x0067", ["1234567"]) == 0.0  # control chars become newlines
    assert string_match_all("  BLPQI,\tOBCFV", ["blpqi", "obcfv"]) == 1.0


def test_insert_many_keeps_order() -> None:
    text = "A a. B b. C c. D d."
    out = insert_many(text, ["X1.", "X2.", "X3."], [0.1, 0.5, 0.5])
    assert out.index("X1.") < out.index("X2.") < out.index("X3.")
    assert out.replace("X1. ", "").replace("X2. ", "").replace("X3. ", "") == text


@pytest.fixture(scope="module")
def examples() -> list:
    return RulerTask(lengths=(700,), samples=2, text=HAYSTACK).examples(tiny_tokenizer())


def test_examples_interleaved_and_budgeted(examples: list) -> None:
    tok = tiny_tokenizer()
    assert [e.meta["subtask"] for e in examples[: len(SUBTASKS)]] == list(SUBTASKS)
    assert len({e.id for e in examples}) == len(examples) == 2 * len(SUBTASKS)
    for ex in examples:
        n = len(tok(ex.prompt).input_ids)
        assert n <= 700 * 1.02, (ex.id, n)
        assert "Question:" in ex.query and ex.split > 0


def test_references_are_in_context(examples: list) -> None:
    for ex in examples:
        sub = ex.meta["subtask"]
        assert ex.refs, ex.id
        for ref in ex.refs:
            assert ref in ex.context, (ex.id, ref)
        if sub == "niah_multivalue":
            assert len(ex.refs) == 4
        if sub == "niah_multikey":
            assert ex.context.count("special magic numbers for") == 4
        if sub == "vt":
            assert len(ex.refs) == 5 and f"VAR {ex.refs[0]} = " in ex.context
            # chain order preserved in the text
            assert [ex.context.index(f"VAR {r} =") for r in ex.refs] == sorted(
                ex.context.index(f"VAR {r} =") for r in ex.refs
            )
        if sub == "cwe":
            body = ex.context.split("\n", 1)[1]
            counts = {w: body.split().count(w) for w in set(body.split()) if not w[0].isdigit()}
            top = sorted(counts.values(), reverse=True)
            assert all(counts[r] == ex.meta["freq_common"] for r in ex.refs) and top[10] < top[9]
        if sub == "fwe":
            assert len(ex.refs) == 3


def test_score_and_aggregate(examples: list) -> None:
    task = RulerTask(lengths=(700,), samples=2, text=HAYSTACK)
    records = []
    for i, ex in enumerate(examples):
        pred = " ".join(ex.refs) if i % 2 == 0 else "no idea"
        records.append({**ex.meta, **task.score(pred, ex)})
    agg = task.aggregate(records)
    assert set(SUBTASKS) <= set(agg) and agg["L700"] == pytest.approx(0.5)
    assert agg["score"] == pytest.approx(sum(agg[s] for s in SUBTASKS) / len(SUBTASKS))


def test_unknown_subtask() -> None:
    with pytest.raises(ValueError, match="unknown RULER"):
        RulerTask(subtasks=("qa_1",))
