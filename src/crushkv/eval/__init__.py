"""Evaluation of KV-cache policies: GSM8K, needle-in-a-haystack, NVIDIA RULER (+ crushkv's ruler-lite) and
streaming perplexity.

``crushkv eval`` / ``crushkv sweep`` write per-example JSONL records and a summary JSON per
(task, model, policy, compression mode) run; ``crushkv report`` turns a results directory into tables and plots.
"""

from __future__ import annotations

from typing import Any

TASKS = ("gsm8k", "niah", "ruler", "ruler-lite", "ppl")


def get_task(name: str, **options: Any) -> Any:
    """Instantiate a task by name (``gsm8k``, ``niah``, ``ruler``, ``ruler-lite``, ``ppl``) with its keyword options."""
    if name == "gsm8k":
        from crushkv.eval.gsm8k import GSM8KTask as cls
    elif name == "niah":
        from crushkv.eval.niah import NIAHTask as cls
    elif name == "ruler":
        from crushkv.eval.ruler import RulerTask as cls
    elif name == "ruler-lite":
        from crushkv.eval.ruler_lite import RulerTask as cls
    elif name == "ppl":
        from crushkv.eval.ppl import PPLTask as cls
    else:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return cls(**options)


__all__ = ["TASKS", "get_task"]
