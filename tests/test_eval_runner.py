"""Runner, result files (resume, interruption), `crushkv eval/sweep/report` command lines and the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import crushkv.models
from conftest_eval import fake_load_model, patch_data
from crushkv.cli import main
from crushkv.eval import results
from crushkv.eval.commands import expand_sweep
from crushkv.eval.niah import NIAHTask
from crushkv.eval.report import policy_label

NIAH_ARGS = [
    "--model",
    "tiny",
    "--task",
    "niah",
    "--lengths",
    "160,200",
    "--depths",
    "0,50,100",
    "--max-new-tokens",
    "3",
    "--no-progress",
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    patch_data(monkeypatch)
    monkeypatch.setattr(crushkv.models, "load_model", fake_load_model)


def _count_calls(monkeypatch: pytest.MonkeyPatch, fail_at: list[int] | None = None) -> list[str]:
    """Record evaluated ids; raise KeyboardInterrupt at call number ``fail_at[0]`` (mutable, 0 = never)."""
    calls: list[str] = []
    original = NIAHTask.evaluate

    def evaluate(self, model, tokenizer, example, policy, mode):  # type: ignore[no-untyped-def]
        calls.append(example.id)
        if fail_at and len(calls) == fail_at[0]:
            raise KeyboardInterrupt
        return original(self, model, tokenizer, example, policy, mode)

    monkeypatch.setattr(NIAHTask, "evaluate", evaluate)
    return calls


def _only(out: Path, suffix: str) -> Path:
    (path,) = out.glob("*" + suffix)
    return path


def test_eval_resume_skips_done_ids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_calls(monkeypatch)
    assert main(["eval", *NIAH_ARGS, "--limit", "2", "--out", str(tmp_path)]) == 0
    assert calls == ["niah-L160-D0", "niah-L160-D50"]
    assert main(["eval", *NIAH_ARGS, "--limit", "4", "--out", str(tmp_path)]) == 0
    assert calls[2:] == ["niah-L160-D100", "niah-L200-D0"]  # first two skipped
    records = results.read_records(_only(tmp_path, ".jsonl"))
    assert [r["id"] for r in records] == ["niah-L160-D0", "niah-L160-D50", "niah-L160-D100", "niah-L200-D0"]
    summary = json.loads(_only(tmp_path, ".summary.json").read_text())
    assert summary["status"] == "complete" and summary["n"] == 4 and summary["n_skipped"] == 2
    assert summary["compression"] == "query-aware" and summary["policy"] == "full"
    assert summary["task_settings"]["lengths"] == [160, 200]
    assert {"versions", "git", "torch_threads"} <= set(summary["environment"])
    assert summary["environment"]["versions"]["torch"]
    for rec in records:
        assert {"prediction", "score", "kept_tokens", "cache_bytes", "time_s", "compression", "policy"} <= set(rec)


def test_interrupt_then_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fail_at = [3]
    calls = _count_calls(monkeypatch, fail_at)
    assert main(["eval", *NIAH_ARGS, "--out", str(tmp_path)]) == 130
    summary = json.loads(_only(tmp_path, ".summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["n"] == 2
    jsonl = _only(tmp_path, ".jsonl")
    with jsonl.open("a") as fh:  # a write cut by a kill
        fh.write('{"id": "niah-L200-D0", "pred')
    calls.clear()
    fail_at[0] = 0
    assert main(["eval", *NIAH_ARGS, "--out", str(tmp_path)]) == 0
    assert calls == ["niah-L160-D100", "niah-L200-D0", "niah-L200-D50", "niah-L200-D100"]
    assert len(results.read_records(jsonl)) == 6
    assert json.loads(_only(tmp_path, ".summary.json").read_text())["status"] == "complete"


def test_changed_settings_refuse_to_mix(tmp_path: Path) -> None:
    assert main(["eval", *NIAH_ARGS, "--limit", "1", "--out", str(tmp_path)]) == 0
    assert main(["eval", *NIAH_ARGS, "--limit", "1", "--seed", "9", "--out", str(tmp_path)]) == 2
    assert main(["eval", *NIAH_ARGS, "--limit", "1", "--seed", "9", "--overwrite", "--out", str(tmp_path)]) == 0


def test_bad_policy_fails_fast(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", *NIAH_ARGS, "--policy", "nonsense:budget=1", "--out", str(tmp_path)]) == 2
    assert "unknown policy" in capsys.readouterr().err


def test_expand_sweep() -> None:
    specs = expand_sweep(["h2o", "h2o+kvcrush:crush=0.75", "full", "snapkv:budget=0.5"], ["256", "512"])
    assert specs == [
        "h2o:budget=256",
        "h2o:budget=512",
        "h2o+kvcrush:crush=0.75,budget=256",
        "h2o+kvcrush:crush=0.75,budget=512",
        "full",
        "snapkv:budget=0.5",
    ]


def test_policy_labels() -> None:
    assert policy_label("full")[2] == "Full"
    assert policy_label("h2o:budget=512,sink=4,recent=32")[2] == "H2O 512-0"
    label = policy_label("h2o+kvcrush:budget=512,sink=4,crush=384,anchor=mean,additive=false")
    assert label == ("KVCrush (mean)", 512.0, "KVCrush 128-384 (mean)")
    assert policy_label("h2o+kvcrush:budget=512,crush=0.25,anchor=alternate")[2] == "KVCrush 384-128 (alternate)"
    assert policy_label("snapkv:budget=0.25")[2] == "SnapKV 25%"


def test_sweep_then_report(tmp_path: Path) -> None:
    args = [
        "sweep",
        *NIAH_ARGS,
        "--limit",
        "2",
        "--out",
        str(tmp_path),
        "--compression",
        "question-agnostic",
        "--method",
        "h2o",
        "--method",
        "h2o+kvcrush:crush=0.75,anchor=mean,recent=8",
        "--budget",
        "64",
        "--budget",
        "128",
    ]
    assert main(args) == 0
    summaries = list(tmp_path.glob("*.summary.json"))
    assert len(summaries) == 5  # full + 2 methods x 2 budgets
    assert all(json.loads(p.read_text())["compression"] == "question-agnostic" for p in summaries)
    assert main(["report", str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    for label in ("| Full |", "| H2O 64-0 |", "| H2O 128-0 |", "| KVCrush 16-48 (mean) |", "| KVCrush 32-96 (mean) |"):
        assert label in text
    assert "## niah (question-agnostic)" in text and "tiny acc" in text
    # paired section: 4 compressed runs vs Full, and each KVCrush run vs the H2O run of the same budget
    assert "Paired comparisons (tiny" in text
    assert "| KVCrush 16-48 (mean) | H2O 64-0 | acc | 2 |" in text and "| H2O 128-0 | Full | acc | 2 |" in text
    assert "| KVCrush 16-48 (mean) | H2O 128-0 |" not in text
    pngs = list((tmp_path / "figures").glob("*.png"))
    assert len(pngs) == 6  # 1 accuracy-vs-budget plot + 5 heatmaps
    assert all(p.stat().st_size > 1000 for p in pngs)
    for png in pngs:
        assert f"figures/{png.name}" in text
    assert "tiny n |" in text and "Same examples for every run" not in text
    # one run extended past the others: the main table shows its own n, a second table rescored on the common 2
    assert (
        main(
            [
                "eval",
                *NIAH_ARGS,
                "--limit",
                "3",
                "--out",
                str(tmp_path),
                "--policy",
                "full",
                "--compression",
                "question-agnostic",
            ]
        )
        == 0
    )
    assert main(["report", str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    common = text.split("Same examples for every run (tiny")[1].split("Paired comparisons")[0]
    assert "| Full | " in common and all(line.endswith(" | 2 |") for line in common.splitlines() if "| KVCrush" in line)
    assert "| Full | " in common and "| 2 |" in common.split("| Full | ")[1].splitlines()[0]
