"""The command line: sub-commands are wired, and every command shares one error path (one line, exit 2; Ctrl-C 130)
that bad input reaches before any model is loaded or any package installed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import crushkv
import crushkv.data
import crushkv.models
import crushkv.packages
from conftest_eval import tiny_model, tiny_tokenizer
from crushkv.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def test_every_subcommand_is_registered():
    choices = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for name in ("demo", "generate", "policies", "models", "eval", "sweep", "report", "bench"):
        assert name in choices


def test_policies_lists_every_registered_policy(capsys):
    from crushkv.policies import REGISTRY

    assert main(["policies"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in REGISTRY) and "+kvcrush" in out and "+adakv" in out
    # what a user would not guess from a spec: KVCrush's phase, and the dense store padding ragged heads
    assert "Default phase=decode whatever the host's" in out
    assert "store=dense pads every head to the largest" in out and "store=dense|paged" in out


def test_version_matches_the_package_metadata(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    version = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert capsys.readouterr().out.strip() == f"crushkv {version}" == f"crushkv {crushkv.__version__}"


@pytest.mark.parametrize("command", ["generate", "demo", "bench"])
def test_help_shows_the_defaults(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: smollm2-135m)" in out and "(default: False)" not in out
    assert {"generate": "(default: 64)", "demo": "(default: 2048)", "bench": "(default: 1k,2k,4k)"}[command] in out


# --------------------------------------------------------------------------------------------- one error path


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fail the test if a model is loaded, a data set installed or pip run: bad input must stop before any."""

    def refuse(*_a, **_k):
        pytest.fail("bad input reached a model load or an install")

    monkeypatch.setattr(crushkv, "load_model", refuse)
    monkeypatch.setattr(crushkv.models, "load_model", refuse)
    monkeypatch.setattr(crushkv.packages, "pip_install", refuse)
    monkeypatch.setattr(crushkv.data, "ensure_data", refuse)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


BAD_INPUT = [
    (["generate", "--policy", "h3o:budget=5", "--prompt", "hi"], "unknown policy 'h3o'; valid policies"),
    (["generate", "--dtype", "fp17", "--prompt", "hi"], "unknown dtype 'fp17'; valid: float32 (fp32), bfloat16"),
    (["generate", "--prompt", "   "], "empty prompt"),
    (["generate", "--max-new-tokens", "0", "--prompt", "hi"], "--max-new-tokens: must be >= 1, got 0"),
    (["eval", "--model", "m", "--task", "ppl", "--ppl-docs", "0"], "--ppl-docs: must be >= 1, got 0"),
    (["eval", "--model", "m", "--task", "niah", "--depths", "0,150"], "depths are percentages in [0, 100]"),
    (["eval", "--model", "m", "--task", "niah", "--lengths", "abc"], "token counts like 1024 or 2k, got 'abc'"),
    (["eval", "--model", "m", "--dtype", "float8"], "unknown dtype 'float8'"),
    (["eval", "--model", "m", "--policy", "snapkv:budget=x"], "budget must be a number"),
    (["eval", "--model", "m", "--task", "ruler", "--ruler-tasks", "qa_1", "--lengths", "1k"], "qa_1 needs a length"),
    (["eval", "--model", "m", "--task", "ruler", "--ruler-tasks", "niah_single"], "unknown RULER task(s)"),
    (["sweep", "--model", "m"], "give at least one --method"),
    (["bench", "--lengths", "abc"], "--lengths: expected token counts like 1024 or 2k, got 'abc'"),
    (["bench", "--lengths", "0"], "token counts must be >= 1"),
    (["bench", "--policy", "nope"], "unknown policy 'nope'"),
    (["demo", "--depth", "150"], "depths are percentages in [0, 100]"),
    (["demo", "--policy", "h2o:budget=0.25,bogus=1"], "unknown key 'bogus'"),
    (["generate", "--unknown-flag"], "unrecognized arguments: --unknown-flag"),
    (["demo", "--model", "smollm2-135"], "did you mean 'smollm2-135m'?"),
    (["bench", "--model", "smollm2-135"], "did you mean 'smollm2-135m'?"),
    (["eval", "--model", "smollm2-135", "--task", "niah"], "did you mean 'smollm2-135m'?"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_INPUT, ids=[" ".join(a[:3]) for a, _ in BAD_INPUT])
def test_bad_input_is_one_line_and_exit_2(argv, message, nothing_loads, capsys):
    assert main(argv) == 2
    assert message in _error_line(capsys)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("smollm2-135", "unknown model 'smollm2-135' (did you mean 'smollm2-135m'?)"),
        ("qwen-coder", "not a hub id (org/name). Catalog: smollm2-135m, qwen2.5-coder-0.5b"),
        ("/no/such/dir", "no such model file or directory: /no/such/dir"),
        ("./missing.gguf", "no such model file or directory: ./missing.gguf"),
    ],
)
def test_bad_model_reference_is_one_line(model, message, monkeypatch, capsys):
    """A catalog typo lists the catalog with the closest name instead of trying (and failing to reach) the hub."""
    monkeypatch.setattr(crushkv.packages, "pip_install", lambda *a, **k: pytest.fail("must not install"))
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda *a, **k: pytest.fail("hub tried"))
    assert main(["generate", "--model", model, "--prompt", "hi"]) == 2
    assert message in _error_line(capsys)


def test_a_directory_without_a_model_is_one_line(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a model")
    assert main(["generate", "--model", str(tmp_path), "--prompt", "hi"]) == 2
    assert "is not a model directory (no config.json and no .gguf file)" in _error_line(capsys)
    assert main(["generate", "--model", str(tmp_path / "notes.txt"), "--prompt", "hi"]) == 2
    assert "is a file but not a .gguf" in _error_line(capsys)


def test_an_unreachable_hub_id_is_one_line(monkeypatch, capsys):
    def offline(*_a, **_k):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")

    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", offline)
    assert main(["generate", "--model", "someorg/some-model", "--prompt", "hi"]) == 2
    line = _error_line(capsys)
    assert "'someorg/some-model' is no local path, and loading it from the Hugging Face hub failed (We couldn't" in line
    assert "smollm2-135m" in line


def test_debug_shows_the_traceback(monkeypatch):
    with pytest.raises(ValueError, match="unknown policy"):
        main(["--debug", "generate", "--policy", "h3o", "--prompt", "hi"])
    monkeypatch.setenv("CRUSHKV_DEBUG", "1")
    with pytest.raises(ValueError, match="unknown policy"):
        main(["generate", "--policy", "h3o", "--prompt", "hi"])


# --------------------------------------------------------------------------------------------- working commands


def _fake_load(calls: list):
    def load(name, **kwargs):
        calls.append((name, kwargs))
        return tiny_model(), tiny_tokenizer()

    return load


def test_generate_accepts_dtype_aliases_and_prints_the_cache_notes(monkeypatch, capsys):
    """``fp16``-style names reach the loader as torch names; the one-line summary is followed by the cache's notes."""
    from crushkv.cache import CrushCache

    calls: list = []
    monkeypatch.setattr(crushkv, "load_model", _fake_load(calls))
    original = CrushCache.summary
    monkeypatch.setattr(CrushCache, "summary", lambda self: {**original(self), "notes": ["first note", "second"]})
    argv = ["generate", "--model", "test/tiny", "--dtype", "bf16", "--prompt", "the idea", "--max-new-tokens", "3"]
    assert main(argv) == 0
    assert calls == [("test/tiny", {"dtype": "bfloat16", "auto_pull": True})]
    err = capsys.readouterr().err
    assert re.search(r"\[full\] tokens seen \d+, kept per layer", err)
    assert "note: first note\nnote: second\n" in err


def test_generate_without_notes_prints_only_the_summary(monkeypatch, capsys):
    monkeypatch.setattr(crushkv, "load_model", _fake_load([]))
    assert main(["generate", "--model", "test/tiny", "--prompt", "the idea", "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err
    assert "tokens seen" in err and "note:" not in err


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--model", "test/tiny", "--prompt", "hi"],
        ["bench", "--model", "test/tiny", "--lengths", "16", "--new-tokens", "2", "--no-progress"],
    ],
)
def test_ctrl_c_exits_130_with_a_message(argv, monkeypatch, capsys):
    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(crushkv, "load_model", interrupted)
    monkeypatch.setattr(crushkv.models, "load_model", interrupted)
    monkeypatch.setattr(crushkv.data, "ensure_data", lambda *a, **k: None)
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err


def test_bench_rejects_lengths_past_the_model_limit_before_running(monkeypatch, capsys):
    """``--lengths 100000`` on a model with 4,096 positions stops right after the load, before any measurement."""
    import crushkv.bench.runner

    monkeypatch.setattr(crushkv.models, "load_model", _fake_load([]))
    monkeypatch.setattr(crushkv.data, "ensure_data", lambda *a, **k: None)
    monkeypatch.setattr(crushkv.bench.runner, "run_bench", lambda *a, **k: pytest.fail("benchmark started"))
    assert main(["bench", "--model", "test/tiny", "--lengths", "1k,100000", "--new-tokens", "4"]) == 2
    assert "--lengths 100000 + --new-tokens 4 needs 100004 positions but the model handles at most 4096" in (
        _error_line(capsys)
    )
