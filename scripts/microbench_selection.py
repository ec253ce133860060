"""Micro-benchmark of the decode-step selection primitives: the sort-based definitions vs crushkv's O(L) versions.

Shapes default to SmolLM2-135M at a 25 % budget of 4k (3 KV heads, 9 query heads, 1025 slots, 64-dim heads).
Usage: ``python scripts/microbench_selection.py [--threads 1] [--slots 1025]``; prints microseconds per call.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from crushkv.selection import mask_to_indices, top_mask


def per_call_us(fn: Callable[[], object], n: int) -> float:
    for _ in range(max(1, n // 20)):
        fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--slots", type=int, default=1025)
    p.add_argument("--calls", type=int, default=2000)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b, hk, hq, length, d = 1, 3, 9, args.slots, 64
    k = (length - 1) * 3 // 4
    keys = torch.rand(b, hk, length, d)
    keep = torch.rand(b, hk, length).argsort(-1)[..., : length - 1].sort(-1).values
    rows = (keep + torch.arange(b * hk).view(b, hk, 1) * length).flatten()
    host = torch.rand(b, hk, length)
    heads = torch.rand(b, hq, length)

    cases = {
        "prune K/V copy: gather": lambda: keys.gather(2, keep[..., None].expand(-1, -1, -1, d)),
        "prune K/V copy: index_select rows": lambda: keys.reshape(-1, d).index_select(0, rows),
        "host top-k: stable sort + sort": lambda: (
            torch.sort(host, dim=-1, descending=True, stable=True).indices[..., :k].sort(-1).values
        ),
        "host top-k: top_mask + mask_to_indices": lambda: mask_to_indices(top_mask(host, k), k),
        "signature bits: stable sort + rank": lambda: (
            torch.empty_like(heads, dtype=torch.long).scatter_(
                -1,
                torch.sort(heads, dim=-1, descending=True, stable=True).indices,
                torch.arange(length).expand(b, hq, length),
            )
            < length // 2
        ),
        "signature bits: top_mask": lambda: top_mask(heads, length // 2),
    }
    print(f"torch {torch.__version__}, {args.threads} thread(s), {length} slots")
    for name, fn in cases.items():
        print(f"{name:45s} {per_call_us(fn, args.calls):9.1f} us")


if __name__ == "__main__":
    main()
