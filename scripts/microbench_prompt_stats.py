"""Micro-benchmark of the prompt pass with exact H2O statistics against plain SDPA, one layer.

Prints, per prompt length, the median and best time of ``torch.nn.functional.scaled_dot_product_attention`` (causal,
GQA) and of ``crushkv.attention_math.attend`` asked for all-row column sums (the exact H2O prompt pass: output and
statistics from the same probability blocks), interleaved round by round, and the extra time per layer.
Shapes default to SmolLM2-135M (9 query heads, 3 KV heads, head dim 64); Qwen2.5-Coder-0.5B is
``--heads 14 --kv-heads 2``. Usage:
``python scripts/microbench_prompt_stats.py [--lengths 1k,2k,4k,8k] [--rounds 7] [--threads 2] [--dtype float32]
[--against REV] [--profile]``; ``--against`` also times ``attention_math.py`` as of a git revision, in the same rounds
(A/B); ``--profile`` adds, per length, where the statistics pass spends its time (``torch.profiler``, self CPU time
per op, one call after the rounds).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from revision import module_at

from crushkv.attention_math import Visibility, attend
from crushkv.bench.commands import parse_lengths
from crushkv.stats import ALL_ROWS, StatsRequest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="1k,2k,4k,8k")
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--stride", type=int, default=1, help="H2O row sampling (1 = exact statistics)")
    p.add_argument("--against", help="git revision whose attention_math.py is timed too (A/B in the same rounds)")
    p.add_argument("--profile", action="store_true", help="also print the statistics pass's time per op")
    args = p.parse_args()
    other = load_revision(args.against) if args.against else None
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    scale = args.head_dim**-0.5
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), {args.heads} heads / {args.kv_heads} KV heads, "
        f"head dim {args.head_dim}, {args.dtype}, stride {args.stride}, {args.rounds} interleaved rounds"
    )
    extra_col = f" {args.against} extra ms (median) |" if other else ""
    print(f"| length | SDPA ms (median / best) | with statistics ms (median / best) | extra ms (median) |{extra_col}")
    print("|---:|---:|---:|---:|" + ("---:|" if other else ""))
    for length in parse_lengths(args.lengths):
        times = time_length(length, args, dtype, scale, other)
        sdpa, stats = (statistics.median(times[n]) for n in ("sdpa", "stats"))
        row = (
            f"| {length} | {sdpa:.1f} / {min(times['sdpa']):.1f} | {stats:.1f} / {min(times['stats']):.1f} | "
            f"{stats - sdpa:+.1f} |"
        )
        if other:
            row += f" {statistics.median(times['other']) - sdpa:+.1f} |"
        print(row)
        if args.profile:
            print(profile_ops(length, args, dtype, scale))


def load_revision(rev: str):
    """``crushkv.attention_math`` as of git revision ``rev``."""
    return module_at(rev, "attention_math")


def inputs(length: int, args: argparse.Namespace, dtype: torch.dtype):
    """Random queries, keys and values of one layer (fixed seed)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, args.heads, length, args.head_dim, generator=gen).to(dtype)
    k = torch.randn(1, args.kv_heads, length, args.head_dim, generator=gen).to(dtype)
    v = torch.randn(1, args.kv_heads, length, args.head_dim, generator=gen).to(dtype)
    return q, k, v


def plain_prompt(length: int) -> Visibility:
    """A causal prompt without padding: slots 0..L-1 hold positions 0..L-1, no mask needed."""
    positions = torch.arange(length).expand(1, 1, length)
    return Visibility(positions, torch.ones(1, 1, length, dtype=torch.bool), torch.arange(length), plain=True)


def profile_ops(length: int, args: argparse.Namespace, dtype: torch.dtype, scale: float) -> str:
    """Self CPU milliseconds per op of one statistics pass (both products of each block are ``aten::bmm``)."""
    q, k, v = inputs(length, args, dtype)
    row_valid = torch.ones(1, length, dtype=torch.bool)
    plain = plain_prompt(length)
    request = StatsRequest(rows=ALL_ROWS, stride=args.stride)
    attend(q, k, v, plain, row_valid, scale, request)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        attend(q, k, v, plain, row_valid, scale, request)
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ops)
    parts = ", ".join(f"{e.key} {e.self_cpu_time_total / 1e3:.1f} ({e.count}x)" for e in ops[:6])
    return f"  {length}: {total / 1e3:.1f} ms self CPU in all; top ops ms (calls): {parts}"


def time_length(length: int, args: argparse.Namespace, dtype: torch.dtype, scale: float, other=None) -> dict:
    """Milliseconds per round of SDPA and of the statistics pass (and ``other``'s) at one prompt length."""
    q, k, v = inputs(length, args, dtype)
    row_valid = torch.ones(1, length, dtype=torch.bool)
    plain = plain_prompt(length)
    request = StatsRequest(rows=ALL_ROWS, stride=args.stride)
    runs = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True),
        "stats": lambda: attend(q, k, v, plain, row_valid, scale, request),
    }
    if other is not None:
        runs["other"] = lambda: other.attend(q, k, v, plain, row_valid, scale, request)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for fn in runs.values():
        fn()  # warm-up
    for _ in range(args.rounds):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


if __name__ == "__main__":
    main()
