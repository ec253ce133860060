"""Needle-in-a-haystack: needle insertion depth, prompt length, scoring."""

from __future__ import annotations

import pytest

from conftest_eval import HAYSTACK, tiny_model, tiny_tokenizer
from crushkv.eval.common import boundary_at_depth, sentence_boundaries, truncate_tokens
from crushkv.eval.niah import ANSWER_PREFIX, NEEDLE, NIAHTask, insert_at_depth, score_niah

TEXT = "One two three. Four five six. Seven eight nine. Ten eleven twelve."


def test_sentence_boundaries() -> None:
    assert sentence_boundaries(TEXT) == [0, 15, 30, 48, len(TEXT)]


@pytest.mark.parametrize(("depth", "expected"), [(0, 0), (25, 15), (50, 30), (75, 48), (100, len(TEXT))])
def test_boundary_at_depth(depth: float, expected: int) -> None:
    assert boundary_at_depth(TEXT, depth / 100) == expected


def test_insert_at_depth_keeps_sentences_whole() -> None:
    out, offset = insert_at_depth(TEXT, "NEEDLE.", 50)
    assert out == "One two three. Four five six. NEEDLE. Seven eight nine. Ten eleven twelve."
    assert out[offset:].startswith("NEEDLE.")
    assert insert_at_depth(TEXT, "NEEDLE.", 0)[0].startswith("NEEDLE. One")
    assert insert_at_depth(TEXT, "NEEDLE.", 100)[0].endswith("twelve. NEEDLE.")


def test_truncate_tokens_respects_budget() -> None:
    tok = tiny_tokenizer()
    cut = truncate_tokens(tok, HAYSTACK, 100)
    assert 50 < len(tok(cut, add_special_tokens=False).input_ids) <= 100
    assert cut.endswith(".") and HAYSTACK.startswith(cut)


def test_grid_examples() -> None:
    tok = tiny_tokenizer()
    task = NIAHTask(lengths=(256, 512), depths=(0, 50, 100), text=HAYSTACK, seed=7)
    examples = task.examples(tok)
    assert [e.id for e in examples][:3] == ["niah-L256-D0", "niah-L256-D50", "niah-L256-D100"]
    codes = set()
    for ex in examples:
        code = ex.refs[0]
        codes.add(code)
        assert len(code) == 7 and code.isdigit()
        assert NEEDLE.format(code=code) in ex.context  # the needle is in the compressible part
        assert ex.prompt.endswith(ANSWER_PREFIX) and "Question:" in ex.query
        n = len(tok(ex.prompt).input_ids)
        assert ex.meta["length"] * 0.8 <= n <= ex.meta["length"]
    depth = {e.meta["depth"]: e.meta["actual_depth"] for e in examples if e.meta["length"] == 512}
    assert depth[0] == 0 and 35 <= depth[50] <= 55 and depth[100] > 90
    assert len(codes) == len(examples)
    # seeded: same needles again, different with another seed
    assert [e.refs for e in task.examples(tok)] == [e.refs for e in examples]
    other = NIAHTask(lengths=(256,), depths=(0,), text=HAYSTACK, seed=8).examples(tok)
    assert other[0].refs != examples[0].refs


def test_chat_layout() -> None:
    ex = NIAHTask(lengths=(256,), depths=(50,), text=HAYSTACK, chat=True).examples(tiny_tokenizer())[0]
    assert ex.context.startswith("<|user|>") and ex.prompt.endswith("<|assistant|>\n" + ANSWER_PREFIX)


def test_score() -> None:
    assert score_niah(" 1234567.", "1234567") == 1.0
    assert score_niah(" 123456", "1234567") == 0.0


@pytest.mark.parametrize("mode", ["query-aware", "question-agnostic"])
def test_evaluate_modes(mode: str) -> None:
    tok = tiny_tokenizer()
    task = NIAHTask(lengths=(256,), depths=(50,), text=HAYSTACK, max_new_tokens=4)
    ex = task.examples(tok)[0]
    rec = task.evaluate(tiny_model(), tok, ex, "h2o:budget=64", mode)
    assert rec["kept_tokens"] <= 64 and rec["seq_len"] == rec["prompt_tokens"] + rec["new_tokens"] - 1
    assert ("kept_tokens_after_context" in rec) == (mode == "question-agnostic")
