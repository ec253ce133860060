"""Run tasks for policies and compression modes, writing resumable per-example records and a summary per run.

``run_task`` runs one policy example by example. ``run_shared`` runs several policies on the same examples with one
context forward per example (``crushkv.fork``): question-agnostic runs only, where the compressed context does not
depend on the question, so every policy's cache can be forked from one pass. Its records equal ``run_task``'s
(``tests/test_eval_shared.py``), so the two write the same files and either resumes the other.
"""

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
from crushkv.eval.common import QUESTION_AGNOSTIC, STREAMING, Example, Task, encode_parts

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
    #: forks of a shared context forward decoded together as one batch (``run_shared``; 1: one by one)
    decode_batch: int = 1
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


def can_share(task: Task, mode: str, n_policies: int, batch_size: int) -> bool:
    """Whether ``run_shared`` applies: several policies, question-agnostic, one example at a time, and a task that
    generates through ``Task.evaluate`` (which takes the forked cache)."""
    return n_policies > 1 and mode == QUESTION_AGNOSTIC and batch_size == 1 and task.shares_prefill


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class Run:
    """The files of one (task, policy, mode) run: the records already written, those to do, and the summary.

    Opening checks that existing results were made with the same settings (``_IDENTITY``); ``close`` writes the
    summary, or removes the files of a run that failed before its first record.
    """

    def __init__(self, task: Task, spec: Any, mode: str, opts: RunOptions, examples: list[Example]) -> None:
        self.task, self.mode = task, mode
        self.policy, self.canonical, phase = resolve_policy(spec)
        opts.out_dir.mkdir(parents=True, exist_ok=True)
        stem = results.run_stem(task.name, opts.model, self.canonical, mode)
        self.records_path = opts.out_dir / (stem + results.RECORDS_SUFFIX)
        self.summary_path = opts.out_dir / (stem + results.SUMMARY_SUFFIX)
        self.model_name = opts.model
        self.summary: dict[str, Any] = {
            "task": task.name,
            "task_settings": task.settings(),
            "model": opts.model,
            "dtype": opts.dtype,
            "attn_implementation": opts.attn_implementation,
            "policy": self.canonical,
            "policy_input": spec if isinstance(spec, str) else self.canonical,
            "policy_phase": phase,
            "compression": mode,
            "seed": opts.seed,
            "limit": opts.limit,
            "batch_size": opts.batch_size,
            "primary_metric": task.primary,
            "records": self.records_path.name,
            **opts.extra,
        }
        if opts.overwrite:
            self.records_path.unlink(missing_ok=True)
        elif self.summary_path.exists():
            old = results.read_json(self.summary_path)
            diff = [k for k in _IDENTITY if old.get(k, _IDENTITY_DEFAULTS.get(k)) != self.summary.get(k)]
            if diff:
                raise ConfigMismatch(
                    f"{self.summary_path} was written with different {', '.join(diff)}; "
                    "use --overwrite or another --out"
                )
        self.summary["environment"] = results.environment()
        self.new_run = not self.summary_path.exists()
        self.examples = examples
        self.wanted = {ex.id for ex in examples}
        done = {r.get("id") for r in results.read_records(self.records_path, repair=True)}
        self.todo = [ex for ex in examples if ex.id not in done]
        self.summary.update(
            status="running", started=_now(), n_planned=len(examples), n_skipped=len(examples) - len(self.todo)
        )
        results.write_json(self.summary_path, self.summary)
        self.t0 = time.perf_counter()
        self.scores: list[float] = []
        self._fh = self.records_path.open("a", encoding="utf-8")

    @property
    def label(self) -> str:
        return f"{self.task.name} {results.policy_slug(self.canonical).rsplit('_', 1)[0]} {self.mode}"

    def add(self, record: dict[str, Any]) -> None:
        record.update(task=self.task.name, policy=self.canonical, compression=self.mode, model=self.model_name)
        results.append_record(self._fh, record)
        if self.task.primary in record:
            self.scores.append(float(record[self.task.primary]))

    def running_mean(self) -> str:
        return f"{sum(self.scores) / len(self.scores):.3g}" if self.scores else "-"

    def close(self, finished: bool, status: str = "complete") -> dict[str, Any]:
        self._fh.close()
        records = [r for r in results.read_records(self.records_path) if r.get("id") in self.wanted]
        if not finished and self.new_run and not records:
            # failed before its first example: leave no empty run behind (eval removes a folder it left empty)
            self.records_path.unlink(missing_ok=True)
            self.summary_path.unlink(missing_ok=True)
            return self.summary
        self.summary.update(
            status=status if len(records) >= len(self.examples) or status == "interrupted" else "incomplete",
            finished=_now(),
            elapsed_s=round(time.perf_counter() - self.t0, 3),
            n=len(records),
            metrics=self.task.aggregate(records),
            means=_means(records),
        )
        results.write_json(self.summary_path, self.summary)
        return self.summary


def _examples(task: Task, tokenizer: Any, opts: RunOptions) -> list[Example]:
    if hasattr(task, "progress"):
        task.progress = opts.progress
    examples = task.examples(tokenizer)
    return examples if opts.limit is None else examples[: opts.limit]


def run_task(model: Any, tokenizer: Any, task: Task, spec: Any, mode: str, opts: RunOptions) -> dict[str, Any]:
    """Evaluate ``task`` with one policy and compression mode; returns the summary (also written to disk).

    Records already present for this configuration are skipped; Ctrl-C writes an ``interrupted`` summary and
    re-raises, leaving a resumable JSONL.
    """
    run = Run(task, spec, mode, opts, _examples(task, tokenizer, opts))
    torch.manual_seed(opts.seed)
    status, finished = "complete", False
    try:
        bar = tqdm(total=len(run.todo), desc=run.label, unit="ex", disable=not opts.progress, dynamic_ncols=True)
        size = max(int(opts.batch_size), 1)
        for start in range(0, len(run.todo), size):
            for record in task.evaluate_batch(model, tokenizer, run.todo[start : start + size], run.policy, mode):
                run.add(record)
                bar.update(1)
                bar.set_postfix({task.primary: run.running_mean()})
        bar.close()
        finished = True
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        summary = run.close(finished, status)
    return summary


def run_shared(
    model: Any, tokenizer: Any, task: Task, specs: list[Any], mode: str, opts: RunOptions
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Evaluate ``task`` with several policies, example by example: one context forward per example and output
    path (``crushkv.fork.prefill_forks``) gives every policy that still needs the example its compressed cache,
    then each continues with the question and decoding. Returns the summaries (in the order of ``specs``) and the
    cost: ``prefill_s`` (the shared forwards), ``forwards``, ``forks`` (caches made from them)."""
    from crushkv.fork import prefill_forks

    if mode != QUESTION_AGNOSTIC:
        raise ValueError(f"run_shared forks the compressed context: question-agnostic runs only, got {mode!r}")
    examples = _examples(task, tokenizer, opts)
    runs: list[Run] = []
    cost = {"prefill_s": 0.0, "forwards": 0, "forks": 0}
    status, finished = "complete", False
    try:
        for spec in specs:
            runs.append(Run(task, spec, mode, opts, examples))
        todo = {id(run): {ex.id for ex in run.todo} for run in runs}
        pending = [ex for ex in examples if any(ex.id in todo[id(run)] for run in runs)]
        torch.manual_seed(opts.seed)
        desc = f"{task.name} {len(runs)} policies {mode}"
        bar = tqdm(total=len(pending), desc=desc, unit="ex", disable=not opts.progress, dynamic_ncols=True)
        for ex in pending:
            members = [run for run in runs if ex.id in todo[id(run)]]
            ctx_ids, _ = encode_parts(tokenizer, ex.context, ex.query)
            caches, timing = prefill_forks(model, [run.policy for run in members], ctx_ids, tokenizer=tokenizer)
            cost["prefill_s"] += timing["prefill_s"]
            cost["forwards"] += timing["forwards"]
            cost["forks"] += len(caches)
            shared = {
                "prefill_s": timing["prefill_s"],
                "prefill_forwards": timing["forwards"],
                "reconstructions": timing["reconstructions"],
                "forks": len(caches),
            }
            size = max(int(opts.decode_batch), 1)
            for start in range(0, len(members), size):
                group, forks = members[start : start + size], caches[start : start + size]
                if size == 1:
                    records = [task.evaluate(model, tokenizer, ex, group[0].policy, mode, prefilled=(forks[0], shared))]
                else:
                    records = task.evaluate_forks(model, tokenizer, ex, [run.policy for run in group], forks, shared)
                for run, record in zip(group, records, strict=True):
                    run.add(record)
                for i in range(start, start + len(group)):
                    caches[i] = None  # decoded: free its storage before the next group's
            del caches
            bar.update(1)
            bar.set_postfix({task.primary: " ".join(run.running_mean() for run in runs[:4])})
        bar.close()
        finished = True
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        summaries = [run.close(finished, status) for run in runs]
    return summaries, cost


def _means(records: list[dict[str, Any]]) -> dict[str, float]:
    """Means of the numeric cost fields (kept tokens, bytes, timings) for the report."""
    keys = (
        "kept_tokens",
        "cache_bytes",
        "cache_bytes_16",
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
