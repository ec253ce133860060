"""``crushkv bench`` grid: every (context length x policy) against the full cache of the same run.

Each cell is the best (lowest end-to-end time) of ``repeats`` runs of :func:`timed_generation` with the profiler on;
repeats are interleaved across policies so slow drift of the machine hits every policy alike.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from crushkv import kernels
from crushkv.bench.fit import fit_exponent
from crushkv.bench.memory import peak_memory
from crushkv.bench.timing import GenerationRun, timed_generation
from crushkv.layer_stack import DEFER_MAX_BYTES
from crushkv.policies import parse_policy
from crushkv.policies.base import resolve_budget

FULL = "full"
#: costs whose growth with the context length is fitted (cell keys)
GROWTH_METRICS = (
    "prefill_s",
    "decode_s_per_token",
    "e2e_s",
    "scoring_overhead_s",
    "observe_s",
    "host_select_s",
    "kvcrush_s",
    "gather_s",
    "kv_nbytes",
    "peak_mem_delta_bytes",
)


@dataclass
class BenchSettings:
    """What one ``crushkv bench`` invocation measures."""

    lengths: list[int]
    policies: list[str]
    new_tokens: int = 32
    repeats: int = 1
    warmup: bool = True
    #: ``crushkv.compress(defer_bytes=...)`` for every run (``None``: the library default)
    defer_bytes: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def run_bench(model, prompt_ids: torch.Tensor, settings: BenchSettings, progress: bool = True) -> dict[str, Any]:
    """Run the grid on ``prompt_ids`` (``[1, >= max(lengths)]``, truncated per length); returns the JSON report."""
    specs = [FULL] + [parse_policy(p).spec for p in settings.policies if parse_policy(p).spec != FULL]
    if prompt_ids.shape[1] < max(settings.lengths):
        raise ValueError(
            f"prompt has {prompt_ids.shape[1]} tokens, fewer than the longest length {max(settings.lengths)}"
        )
    device = prompt_ids.device
    cpu_kernels = kernels.describe() if device.type == "cpu" else "n/a"  # a first build stays out of the timings
    env = environment(device)  # load average before the measurements
    if settings.warmup:  # first calls pay one-off costs (kernels, allocator growth): keep them out of the numbers
        warm = prompt_ids[:, : min(settings.lengths)]
        for spec in specs:
            timed_generation(model, warm, spec, 2, profile=True, defer_bytes=settings.defer_bytes)
    cells: list[dict[str, Any]] = []
    bar = _progress(len(settings.lengths) * len(specs) * settings.repeats, progress)
    for length in settings.lengths:
        ids = prompt_ids[:, :length]
        best: dict[str, tuple[GenerationRun, Any]] = {}
        for _ in range(settings.repeats):
            for spec in specs:
                bar.set_description(f"{length} {spec.split(':')[0]}")
                gc.collect()
                with peak_memory(device) as mem:
                    run = timed_generation(
                        model, ids, spec, settings.new_tokens, profile=True, defer_bytes=settings.defer_bytes
                    )
                if spec not in best or run.total_s < best[spec][0].total_s:
                    best[spec] = (run, mem)
                bar.update(1)
        full_cell = cell_from_run(*best[FULL], length=length)
        for spec in specs:
            cells.append(add_ratios(cell_from_run(*best[spec], length=length), full_cell))
    bar.close()
    report = {
        "meta": {
            **env,
            **settings.meta,
            "lengths": settings.lengths,
            "policies": specs,
            "new_tokens": settings.new_tokens,
            "repeats": settings.repeats,
            "defer_bytes": DEFER_MAX_BYTES if settings.defer_bytes is None else settings.defer_bytes,
            "cpu_kernels": cpu_kernels,
        }
    }
    report["cells"] = cells
    report["fits"] = growth_fits(cells)
    report["targets"] = check_targets(cells)
    return report


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit="run", leave=False)


# ----------------------------------------------------------------------------------------------------------- cells
def cell_from_run(run: GenerationRun, mem: Any, length: int) -> dict[str, Any]:
    """Flat record of one (length, policy) run: times, profiler sections, bytes, memory."""
    sec = {k: run.sections.get(k, 0.0) for k in ("attention", "observe", "select", "kvcrush", "gather")}
    pre = {k: run.prefill_sections.get(k, 0.0) for k in ("attention", "observe", "select", "kvcrush", "gather")}
    steps = max(run.new_tokens - 1, 1)
    cell: dict[str, Any] = {
        "length": length,
        "policy": run.policy,
        "prompt_tokens": run.prompt_tokens,
        "new_tokens": run.new_tokens,
        "prefill_s": run.prefill_s,
        "ttft_s": run.prefill_s,
        "decode_s": run.decode_s,
        "decode_s_per_token": run.decode_s / steps,
        "decode_tokens_per_s": run.decode_tokens_per_s,
        "e2e_s": run.total_s,
        "sections_s": sec,
        "prefill_sections_s": pre,
        "observe_s": sec["observe"],
        "host_select_s": max(0.0, sec["select"] - sec["kvcrush"]),  # the kvcrush section runs inside select
        "kvcrush_s": sec["kvcrush"],
        "gather_s": sec["gather"],
        "kv_nbytes": run.nbytes,
        "kv_logical_nbytes": run.logical_nbytes,
        "full_nbytes": run.full_nbytes,
        "max_nbytes": run.max_nbytes,
        "kept_tokens_mean": sum(run.kept_tokens) / len(run.kept_tokens) if run.kept_tokens else 0.0,
        "peak_mem_kind": mem.kind,
        "peak_mem_bytes": mem.peak,
        "peak_mem_delta_bytes": mem.delta,
        "output_ids": run.output_ids,
    }
    cell.update(byte_check(run))
    return cell


def expected_tokens(spec: str, length: int, step: int) -> int:
    """Slots per compressed layer the policy should hold ``step`` decode forwards after a ``length`` prompt."""
    policy = parse_policy(spec)
    seen = length + step
    if not getattr(policy, "compresses", True) or policy.budget is None:
        return seen
    budget = resolve_budget(policy.budget, length, policy.min_budget())
    if getattr(policy, "additive", False):
        budget += policy.crush_tokens(budget)
    return min(seen, budget if policy.phase == "decode" else budget + step)


def byte_check(run: GenerationRun) -> dict[str, Any]:
    """Tokens held after every step vs. the budget's share of an uncompressed cache at that step, and the real
    storage over the tokens held (the store's slack: a dense store's reserve and growth step, page rounding).

    Assumes every layer is compressed with the same nominal budget (true for the supported full-attention models;
    PyramidKV's layer budgets average to it).
    """
    if not run.nbytes_trace:
        return {}
    seen_end = run.prompt_tokens + len(run.nbytes_trace) - 1
    per_token = run.full_nbytes / seen_end
    deviations = []
    held_trace = run.logical_trace or run.nbytes_trace
    for step, held in enumerate(held_trace):
        expected = per_token * expected_tokens(run.policy, run.prompt_tokens, step)
        deviations.append(held / expected - 1.0)
    worst = max(deviations, key=abs)
    overhead = [real / held - 1.0 for real, held in zip(run.nbytes_trace, held_trace) if held]
    return {
        "storage_overhead_max": max(overhead, default=0.0),
        "expected_max_nbytes": per_token * expected_tokens(run.policy, run.prompt_tokens, len(run.nbytes_trace) - 1),
        "bytes_vs_expected_max_dev": worst,
        "bytes_steps_checked": len(deviations),
    }


def add_ratios(cell: dict[str, Any], full: dict[str, Any]) -> dict[str, Any]:
    """Compressed-vs-full ratios and scoring overhead, both from the same invocation (and the same length)."""
    e2e = cell["e2e_s"]
    overhead = max(0.0, cell["sections_s"]["attention"] - full["sections_s"]["attention"])
    prefill_overhead = max(0.0, cell["prefill_sections_s"]["attention"] - full["prefill_sections_s"]["attention"])
    cell["scoring_overhead_s"] = overhead
    cell["prefill_scoring_s"] = prefill_overhead + cell["prefill_sections_s"]["observe"]
    for key in ("scoring_overhead_s", "observe_s", "host_select_s", "kvcrush_s", "gather_s"):
        cell[key.removesuffix("_s") + "_pct_e2e"] = 100.0 * cell[key] / e2e if e2e > 0 else math.nan
    cell["prefill_scoring_pct_prefill"] = 100.0 * cell["prefill_scoring_s"] / cell["prefill_s"]
    cell["vs_full"] = {
        "prefill": _ratio(cell["prefill_s"], full["prefill_s"]),
        "decode_tokens_per_s": _ratio(cell["decode_tokens_per_s"], full["decode_tokens_per_s"]),
        "e2e": _ratio(e2e, full["e2e_s"]),
        "kv_nbytes": _ratio(cell["kv_nbytes"], full["kv_nbytes"]),
        "peak_mem_delta": _ratio(cell["peak_mem_delta_bytes"], full["peak_mem_delta_bytes"]),
        "same_output": cell["output_ids"] == full["output_ids"],
    }
    return cell


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) else math.nan


# ----------------------------------------------------------------------------------------------------------- summary
def growth_fits(cells: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per policy and metric: exponent ``k`` of ``cost ~ length**k`` (least squares on log-log)."""
    fits: dict[str, dict[str, dict[str, float]]] = {}
    for policy in dict.fromkeys(c["policy"] for c in cells):
        rows = [c for c in cells if c["policy"] == policy]
        lengths = [c["length"] for c in rows]
        fits[policy] = {m: fit_exponent(lengths, [float(c.get(m, 0.0)) for c in rows]) for m in GROWTH_METRICS}
    return fits


def check_targets(cells: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, measured (reported, never asserted)."""
    out: list[dict[str, Any]] = []
    compressed = [c for c in cells if c["policy"] != FULL]
    for c in compressed:
        where = {"policy": c["policy"], "length": c["length"]}
        if "+kvcrush" in c["policy"]:
            out.append(
                {
                    "target": "kvcrush selection <= 0.5% of e2e",
                    **where,
                    "value": c["kvcrush_pct_e2e"],
                    "ok": c["kvcrush_pct_e2e"] <= 0.5,
                }
            )
        out.append(
            {
                "target": "KV bytes within 2% of budget share at every step",
                **where,
                "value": 100.0 * c["bytes_vs_expected_max_dev"],
                "ok": abs(c["bytes_vs_expected_max_dev"]) <= 0.02,
            }
        )
    lengths = sorted({c["length"] for c in cells})
    at4k = min(lengths, key=lambda n: abs(n - 4096))
    # the target is set at 4k; a run without 4k checks it at its closest length and says which one
    where_4k = "at 4k" if at4k == 4096 else f"at {at4k} (closest to the 4k target)"
    for c in compressed:
        if c["length"] == at4k:
            out.append(
                {
                    "target": f"score collection <= 10% of prefill {where_4k}",
                    "policy": c["policy"],
                    "length": at4k,
                    "value": c["prefill_scoring_pct_prefill"],
                    "ok": c["prefill_scoring_pct_prefill"] <= 10.0,
                }
            )
    longest = lengths[-1]
    for c in compressed:
        if c["length"] == longest and _is_quarter_budget(c["policy"]):
            value = c["vs_full"]["decode_tokens_per_s"]
            out.append(
                {
                    "target": f"decode tok/s at 25% budget >= full at {longest}",
                    "policy": c["policy"],
                    "length": longest,
                    "value": value,
                    "ok": value >= 1.0,
                }
            )
    return out


def _is_quarter_budget(spec: str) -> bool:
    budget = getattr(parse_policy(spec), "budget", None)
    return isinstance(budget, float) and abs(budget - 0.25) < 1e-9


def environment(device: torch.device) -> dict[str, Any]:
    """Where the numbers come from."""
    env: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    with contextlib.suppress(OSError):
        env["loadavg_start"] = list(os.getloadavg())
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env
