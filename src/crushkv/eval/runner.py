"""Run one task for one policy and compression mode, writing resumable per-example records and a summary."""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from crushkv.errors import CrushkvError
from crushkv.eval import results
from crushkv.eval.common import STREAMING, Task

# summary keys that must match for a rerun to append to existing records; batch_size is one because a batch is
# left-padded and batched matmuls round differently, so greedy outputs can differ from batch size 1 at ties
_IDENTITY = ("task", "task_settings", "model", "dtype", "policy", "compression", "batch_size")
# values of identity keys in summaries written before the key existed
_IDENTITY_DEFAULTS = {"batch_size": 1}


@dataclass
class RunOptions:
    """Run-level settings shared by every (task, policy, mode) run of one command."""

    model: str
    out_dir: Path
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    seed: int = 1234
    limit: int | None = None
    batch_size: int = 1
    overwrite: bool = False
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


class ConfigMismatch(CrushkvError, RuntimeError):
    """Existing results in the output directory were produced with different settings."""


def resolve_policy(spec: Any) -> tuple[Any, str, str | None]:
    """(policy object, canonical spec, phase) from a spec string or policy object."""
    from crushkv.policies import parse_policy

    policy = parse_policy(spec)
    return policy, str(getattr(policy, "spec", spec)), getattr(policy, "phase", None)


def modes_for(task: Task, requested: list[str]) -> list[str]:
    """Compression modes that apply to ``task`` (perplexity has no question: always ``streaming``)."""
    if task.modes == (STREAMING,):
        return [STREAMING]
    return [m for m in requested if m in task.modes]


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def run_task(model: Any, tokenizer: Any, task: Task, spec: Any, mode: str, opts: RunOptions) -> dict[str, Any]:
    """Evaluate ``task`` with one policy and compression mode; returns the summary (also written to disk).

    Records already present for this configuration are skipped; Ctrl-C writes an ``interrupted`` summary and
    re-raises, leaving a resumable JSONL.
    """
    policy, canonical, phase = resolve_policy(spec)
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    stem = results.run_stem(task.name, opts.model, canonical, mode)
    records_path = opts.out_dir / (stem + results.RECORDS_SUFFIX)
    summary_path = opts.out_dir / (stem + results.SUMMARY_SUFFIX)
    if hasattr(task, "progress"):
        task.progress = opts.progress

    summary: dict[str, Any] = {
        "task": task.name,
        "task_settings": task.settings(),
        "model": opts.model,
        "dtype": opts.dtype,
        "attn_implementation": opts.attn_implementation,
        "policy": canonical,
        "policy_input": spec if isinstance(spec, str) else canonical,
        "policy_phase": phase,
        "compression": mode,
        "seed": opts.seed,
        "limit": opts.limit,
        "batch_size": opts.batch_size,
        "primary_metric": task.primary,
        "records": records_path.name,
        **opts.extra,
    }
    if opts.overwrite:
        records_path.unlink(missing_ok=True)
    elif summary_path.exists():
        old = results.read_json(summary_path)
        diff = [k for k in _IDENTITY if old.get(k, _IDENTITY_DEFAULTS.get(k)) != summary.get(k)]
        if diff:
            raise ConfigMismatch(
                f"{summary_path} was written with different {', '.join(diff)}; use --overwrite or another --out"
            )
    summary["environment"] = results.environment()
    new_run = not summary_path.exists()

    examples = task.examples(tokenizer)
    if opts.limit is not None:
        examples = examples[: opts.limit]
    wanted = {ex.id for ex in examples}
    done = {r.get("id") for r in results.read_records(records_path, repair=True)}
    todo = [ex for ex in examples if ex.id not in done]
    summary.update(status="running", started=_now(), n_planned=len(examples), n_skipped=len(examples) - len(todo))
    results.write_json(summary_path, summary)

    torch.manual_seed(opts.seed)
    t0 = time.perf_counter()
    status = "complete"
    finished = False
    desc = f"{task.name} {results.policy_slug(canonical).rsplit('_', 1)[0]} {mode}"
    try:
        with records_path.open("a", encoding="utf-8") as fh:
            bar = tqdm(total=len(todo), desc=desc, unit="ex", disable=not opts.progress, dynamic_ncols=True)
            running: list[float] = []
            size = max(int(opts.batch_size), 1)
            for start in range(0, len(todo), size):
                for record in task.evaluate_batch(model, tokenizer, todo[start : start + size], policy, mode):
                    record.update(task=task.name, policy=canonical, compression=mode, model=opts.model)
                    results.append_record(fh, record)
                    bar.update(1)
                    if task.primary in record:
                        running.append(float(record[task.primary]))
                        bar.set_postfix({task.primary: f"{sum(running) / len(running):.3g}"})
            bar.close()
        finished = True
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        records = [r for r in results.read_records(records_path) if r.get("id") in wanted]
        if not finished and new_run and not records:
            # failed before its first example: leave no empty run behind (eval removes a folder it left empty)
            records_path.unlink(missing_ok=True)
            summary_path.unlink(missing_ok=True)
        else:
            summary.update(
                status=status if len(records) >= len(examples) or status == "interrupted" else "incomplete",
                finished=_now(),
                elapsed_s=round(time.perf_counter() - t0, 3),
                n=len(records),
                metrics=task.aggregate(records),
                means=_means(records),
            )
            results.write_json(summary_path, summary)
    return summary


def _means(records: list[dict[str, Any]]) -> dict[str, float]:
    """Means of the numeric cost fields (kept tokens, bytes, timings) for the report."""
    keys = (
        "kept_tokens",
        "cache_bytes",
        "seq_len",
        "new_tokens",
        "prompt_tokens",
        "time_s",
        "ttft_s",
        "decode_tok_s",
        "prefill_s",
        "tok_s",
    )
    out = {}
    for key in keys:
        vals = [float(r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if vals:
            out[key] = sum(vals) / len(vals)
    return out
