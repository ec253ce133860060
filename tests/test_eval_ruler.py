"""NVIDIA RULER (``crushkv.eval.ruler``): prompt split, chat/base assembly, scoring, aggregation, length checks;
the slow tests generate all 13 tasks from the real wheel."""

from __future__ import annotations

import pytest

from conftest_eval import tiny_tokenizer
from crushkv.eval import ruler_data
from crushkv.eval.ruler import TASKS, RulerTask, postprocess
from crushkv.eval.ruler_data import RulerExample, _split

# RULER's niah template (constants.py) and answer prefix: the split must find the question and the prefix
NIAH = {
    "template": "Some special magic numbers are hidden within the following text. Make sure to memorize it. I will "
    "quiz you about the numbers afterwards.\n{context}\nWhat are all the special magic numbers for {query} "
    "mentioned in the provided text?",
    "answer_prefix": " The special magic numbers for {query} mentioned in the provided text are",
}


def _row(text: str) -> dict:
    return {"index": 3, "input": text, "outputs": ["123"]}


def test_split_finds_the_question_after_a_context_that_repeats_the_template_words():
    # a haystack that itself contains "What are" and "The special": the split takes the last occurrence
    context = "Some special magic numbers are hidden ... afterwards.\nWhat are you doing? The special one. 123."
    question = "\nWhat are all the special magic numbers for sad-cat mentioned in the provided text?"
    prefix = " The special magic numbers for sad-cat mentioned in the provided text are"
    ex = _split("niah_multivalue", NIAH, _row(context + question + prefix))
    assert (ex.context, ex.question, ex.answer_prefix) == (context, question, prefix)
    assert ex.index == 3 and ex.metric == "string_match_all" and ex.outputs == ["123"]


def test_split_singular_rewording_still_matches():
    # RULER rewrites "numbers are" -> "number is" for single needles: the anchors are the first words only
    text = "ctx ctx\nWhat is the special magic number for x mentioned in the provided text? The special magic number"
    ex = _split("niah_single_1", NIAH, _row(text))
    assert ex.context == "ctx ctx" and ex.question.startswith("\nWhat is") and ex.answer_prefix.startswith(" The")


def test_split_without_the_question_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot find where its question starts"):
        _split("niah_single_1", NIAH, _row("no template text here at all"))


def _example(task: str = "niah_single_1", outputs=("8090293",)) -> RulerExample:
    return RulerExample(
        task=task,
        index=0,
        context="A special magic number is hidden. One of the special magic numbers for x is: 8090293.",
        question="\nWhat is the special magic number for x mentioned in the provided text?",
        answer_prefix=" The special magic number for x mentioned in the provided text is",
        outputs=list(outputs),
        tokens_to_generate=128,
        metric=ruler_data.metric_for(task),
    )


def test_base_prompt_is_rulers_input_and_compresses_everything_before_the_question():
    ex = _example()
    built = RulerTask(subtasks=("niah_single_1",), lengths=(1024,), samples=1).build(ex, 1024, tiny_tokenizer())
    assert built.prompt == ex.context + ex.question + ex.answer_prefix
    assert built.context == ex.context and built.query == ex.question + ex.answer_prefix
    assert built.meta == {"subtask": "niah_single_1", "length": 1024, "sample": 0, "max_new_tokens": 128,
                          "metric": "string_match_all"}  # fmt: skip


def test_chat_prompt_puts_the_task_in_the_user_turn_and_the_answer_prefix_in_the_assistant_turn():
    ex = _example()
    tok = tiny_tokenizer()
    built = RulerTask(subtasks=("niah_single_1",), lengths=(1024,), samples=1, chat=True).build(ex, 1024, tok)
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": ex.context + ex.question}], tokenize=False, add_generation_prompt=True
    )
    assert built.prompt == rendered + ex.answer_prefix.lstrip()
    assert built.query.startswith(ex.question) and ex.context in built.context


@pytest.mark.parametrize(
    ("task", "prediction", "refs", "score"),
    [
        ("niah_multivalue", " 1, 2 and 3.", ["1", "2", "3", "4"], 0.75),  # string_match_all: the fraction found
        ("niah_single_1", "The number is 8090293.", ["8090293"], 1.0),
        ("vt", "VAR ABCDE", ["abcde", "fghij"], 0.5),  # case-insensitive
        ("qa_1", "France", ["France", "the Kingdom of France"], 1.0),  # string_match_part: any reference
        ("qa_2", "Germany", ["France", "Spain"], 0.0),
        ("niah_single_1", "80902\x0093", ["8090293"], 0.0),  # a control character breaks the match, as in RULER
    ],
)
def test_scores_are_rulers_own_metrics(task, prediction, refs, score):
    pytest.importorskip("long_context_eval", reason="RULER's wheel (crushkv.data.ensure_data(['ruler']))")
    task_obj = RulerTask(subtasks=(task,), lengths=(4096,), samples=1)
    example = task_obj.build(_example(task, refs), 4096, tiny_tokenizer())
    assert task_obj.score(prediction, example) == {"score": pytest.approx(score)}


def test_postprocess_is_rulers():
    assert postprocess("  a\tb\x00c \n") == "a\nb\nc"


def test_average_is_over_tasks_not_over_examples():
    task = RulerTask(subtasks=("niah_single_1", "vt"), lengths=(4096,), samples=3)
    records = [{"subtask": "niah_single_1", "length": 4096, "score": s} for s in (1.0, 1.0, 1.0)]
    records += [{"subtask": "vt", "length": 4096, "score": 0.0}]
    out = task.aggregate(records)
    assert out["niah_single_1"] == 1.0 and out["vt"] == 0.0 and out["score"] == 0.5
    assert out["L4096"] == pytest.approx(0.75)


def test_bad_tasks_and_lengths_are_clear_errors():
    with pytest.raises(ValueError, match=r"unknown RULER task\(s\) \['niah_single'\]"):
        RulerTask(subtasks=("niah_single",))
    with pytest.raises(ValueError, match="qa_2 needs a length of at least 4096"):
        RulerTask(subtasks=("qa_2",), lengths=(2048,))
    with pytest.raises(ValueError, match="niah_single_1 needs a length of at least 384"):
        RulerTask(subtasks=("niah_single_1",), lengths=(200,))
    with pytest.raises(ValueError, match="samples must be >= 1"):
        RulerTask(samples=0)


def test_sentence_splitter_stand_in():
    namespace: dict = {}
    exec(ruler_data._SENT_TOKENIZE, namespace)
    split = namespace["sent_tokenize"]
    text = 'It works. "Quoted start." Then 3 more? Yes! e.g. lower case stays. (Paren) ok.'
    assert split(text) == ["It works.", '"Quoted start."', "Then 3 more?", "Yes! e.g. lower case stays.", "(Paren) ok."]


# ------------------------------------------------------------------------------------------------ the real generators


@pytest.fixture(scope="module")
def real_tokenizer():
    import crushkv
    from conftest import ensure_smollm2
    from crushkv.data import ensure_data

    ensure_data(["ruler"])
    return crushkv.load_model(ensure_smollm2())[1]


@pytest.mark.slow
def test_configs_of_the_installed_wheel_match_crushkvs_table(real_tokenizer):
    for task in TASKS:
        assert ruler_data.task_config(task)["tokens_to_generate"] == ruler_data.TOKENS_TO_GENERATE[task], task


@pytest.mark.slow
def test_all_13_tasks_generate_offline_and_split(real_tokenizer):
    length = 4096
    task = RulerTask(lengths=(length,), samples=2, chat=True)
    examples = task.examples(real_tokenizer)
    assert [e.meta["subtask"] for e in examples[:13]] == list(TASKS)
    assert len(examples) == 26 and len({e.id for e in examples}) == 26
    for ex in examples:
        sub = ex.meta["subtask"]
        n = len(real_tokenizer(ex.prompt, add_special_tokens=False).input_ids)
        # RULER fits prompt + answer into the length; the chat template adds its few tokens on top
        assert length // 2 < n + ex.meta["max_new_tokens"] <= length + 64, (ex.id, n)
        assert ex.split > 0 and ex.query.strip() and ex.refs, ex.id
        if sub.startswith(("niah", "vt", "cwe", "fwe")):
            for ref in ex.refs:
                assert ref.lower() in ex.context.lower(), (ex.id, ref)  # the answer is in what gets compressed
        if sub.startswith("niah"):
            assert not any(ref.lower() in ex.query.lower() for ref in ex.refs), ex.id  # asked, not told
    # a second call reads the cached generation: same examples
    assert [e.prompt for e in task.examples(real_tokenizer)] == [e.prompt for e in examples]
