"""GSM8K prompt building and lm-eval gsm8k v3 scoring (strict-match / flexible-extract)."""

from __future__ import annotations

import pytest

from conftest_eval import GSM8K_ITEMS, tiny_model, tiny_tokenizer
from crushkv.eval.gsm8k import (
    INVALID,
    GSM8KTask,
    exact_match,
    flexible_extract,
    normalize,
    score_gsm8k,
    strict_extract,
)

REF = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72"


@pytest.mark.parametrize(
    ("completion", "strict", "flexible"),
    [
        (" She sold 24 + 48 = 72 clips.\n#### 72", "72", "72"),
        (" 10 apples, then 72 in total.", INVALID, "72"),
        (" The answer is 72.", INVALID, "72."),
        (" no numbers at all", INVALID, INVALID),
        (" #### 1,234", "1,234", "1,234"),
        (" it costs $5.", INVALID, "$5."),
        (" #### -3\nQuestion: 7", "-3", "7"),
        (" first 12 then 3", INVALID, "3"),  # single digits match the second alternative
        (" #### 5 then #### 6", "5", "6"),  # strict takes the first, flexible the last
    ],
)
def test_extractors(completion: str, strict: str, flexible: str) -> None:
    assert strict_extract(completion) == strict
    assert flexible_extract(completion) == flexible


def test_normalize_applies_regexes_to_ignore_in_order() -> None:
    assert normalize(REF) == "72"
    assert normalize("#### 1,234") == "1234"
    assert normalize("$5.") == "5"
    assert normalize("5.5") == "5.5"
    assert normalize("ABC") == "abc"  # ignore_case


@pytest.mark.parametrize(
    ("pred", "ref", "hit"),
    [
        ("1,234", "Some work.\n#### 1234", 1.0),
        ("1234", "Some work.\n#### 1,234", 1.0),
        ("$5.", "#### 5", 1.0),
        ("5.0", "#### 5", 0.0),  # no numeric equivalence in lm-eval
        (INVALID, "#### 5", 0.0),
        ("72", REF, 1.0),
    ],
)
def test_exact_match(pred: str, ref: str, hit: float) -> None:
    assert exact_match(pred, ref) == hit


def test_score_strict_vs_flexible() -> None:
    s = score_gsm8k(" 24 + 48 = 72 clips. So the answer is 72", REF)
    assert s["strict"] == 0.0 and s["flexible"] == 1.0 and s["strict_extracted"] == INVALID
    s = score_gsm8k(" 24 + 48 = 72.\n#### 72", REF)
    assert s["strict"] == 1.0 and s["flexible"] == 1.0
    s = score_gsm8k(" #### 71", REF)
    assert s["strict"] == 0.0 and s["flexible"] == 0.0


def test_prompt_layout_and_shots_not_scored() -> None:
    task = GSM8KTask(items=GSM8K_ITEMS)
    examples = task.examples(tiny_tokenizer())
    # the last 8 items are reserved for shots (short list) and never scored
    assert [e.id for e in examples] == [f"gsm8k-{i}" for i in range(len(GSM8K_ITEMS) - 8)]
    ex = examples[0]
    assert ex.query == f"Question: {GSM8K_ITEMS[0]['question']}\nAnswer:"
    shots = ex.context.split("\n\n")
    assert ex.context.endswith("\n\n") and len([s for s in shots if s.startswith("Question: ")]) == 5
    assert ex.context.startswith(f"Question: {GSM8K_ITEMS[4]['question']}\nAnswer: {GSM8K_ITEMS[4]['answer']}\n\n")
    for shot in GSM8K_ITEMS[4:9]:
        assert shot["question"] in ex.context
    assert "reserved" in task.settings()["shot_source"]


def test_chat_prompt_multiturn() -> None:
    task = GSM8KTask(items=GSM8K_ITEMS, chat=True)
    ex = task.examples(tiny_tokenizer())[0]
    assert ex.context.count("<|user|>") == 6 and ex.context.count("<|assistant|>") == 5
    assert ex.query.startswith("Question: ") and ex.query.endswith("<|assistant|>\n")


def test_postprocess_truncates_at_question() -> None:
    task = GSM8KTask(items=GSM8K_ITEMS)
    assert task.postprocess(" 3 + 4 = 7\n#### 7\n\nQuestion: next one 9") == " 3 + 4 = 7\n#### 7\n\n"


def test_evaluate_record_fields() -> None:
    task = GSM8KTask(items=GSM8K_ITEMS, max_new_tokens=8)
    tok = tiny_tokenizer()
    ex = task.examples(tok)[0]
    rec = task.evaluate(tiny_model(), tok, ex, "full", "query-aware")
    for key in ("prediction", "strict", "flexible", "kept_tokens", "cache_bytes", "time_s", "new_tokens"):
        assert key in rec
    assert rec["new_tokens"] <= 8 and rec["prompt_tokens"] > rec["context_tokens"]
