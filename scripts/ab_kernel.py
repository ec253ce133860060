"""Interleaved A/B of one compiled op: the current build vs the same kernel source as of a git revision.

The old source (``git show REV:src/crushkv/kernels/<file>``) is compiled with the project's flags under the op
namespace ``crushkv_ab`` (so both builds load in one process), checked to give the same result on the same inputs,
then both are called in alternating order. Ops and inputs: ``kvcrush_reps`` on the decode cut of
``microbench_kvcrush.stand_in_layer`` (SmolLM2 shapes: 30 layers x 3 KV heads x 9 signature heads, H2O scores,
25 % budget), ``exact_prompt`` on one SmolLM2 layer's prompt (with SDPA timed beside it). Usage:
``python scripts/ab_kernel.py --op kvcrush_reps --against REV [--lengths 1k,4k] [--rounds 300] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from microbench_kvcrush import stand_in_layer
from revision import ROOT

from crushkv import kernels
from crushkv.attention_math import HEAD_BLOCK_ELEMENTS
from crushkv.bench.commands import parse_lengths
from crushkv.policies import parse_policy

SOURCES = {"kvcrush_reps": "kvcrush_select.cpp", "exact_prompt": "exact_prompt.cpp"}


def build_at(rev: str, source: str) -> None:
    """Compile ``source`` as of ``rev`` under the ``crushkv_ab`` namespace and load it."""
    text = subprocess.run(
        ["git", "show", f"{rev}:src/crushkv/kernels/{source}"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    for macro in ("TORCH_LIBRARY(crushkv,", "TORCH_LIBRARY_FRAGMENT(crushkv,", "TORCH_LIBRARY_IMPL(crushkv,"):
        text = text.replace(macro, macro.replace("crushkv,", "crushkv_ab,"))
    work = Path(tempfile.mkdtemp())
    (work / source).write_text(text)
    listed = subprocess.run(
        ["git", "ls-tree", "--name-only", f"{rev}:src/crushkv/kernels"], cwd=ROOT, check=True, capture_output=True
    ).stdout.decode()
    for header in (name for name in listed.split() if name.endswith(".h")):  # the headers of the same revision
        done = subprocess.run(["git", "show", f"{rev}:src/crushkv/kernels/{header}"], cwd=ROOT, capture_output=True)
        (work / header).write_bytes(done.stdout)
    library = work / "ab.so"
    cmd = [kernels.compiler(), str(work / source), *kernels._flags(), "-o", str(library)]
    subprocess.run(cmd, check=True)
    torch.ops.load_library(str(library))


def inputs(op: str, length: int) -> tuple[tuple, dict]:
    """The op's arguments at ``length``, and extra functions to time beside it."""
    if op == "kvcrush_reps":
        policy = parse_policy("h2o+kvcrush:budget=0.25,crush=0.25,anchor=mean")
        budget = length // 4
        layer = stand_in_layer(30, 3, 3, budget + 1, length, True)
        host_tokens, crush_tokens = policy.split(layer, budget)
        host_mask = policy.host.keep_mask(layer, host_tokens)
        scores = policy.host.head_scores(layer).float().reshape(30, 9, -1).contiguous()
        empty = torch.empty(0, dtype=torch.bool)
        args = (scores, layer.valid, layer.positions, layer.start, layer.seen, policy.sink, policy.recent, host_mask,
                layer.order, empty, 3, crush_tokens, 0)  # fmt: skip
        return args, {}
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 3, length, *shape, generator=gen) for shape in ((3, 64), (64,), (64,)))
    qs, ks, vs = (torch.randn(1, 9, length, 64, generator=gen) for _ in range(3))

    def sdpa() -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True)

    return (q, k * 0.125, v, HEAD_BLOCK_ELEMENTS, False), {"sdpa": sdpa}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--op", choices=tuple(SOURCES), default="kvcrush_reps")
    p.add_argument("--against", required=True, help="git revision of the other build")
    p.add_argument("--lengths", default="1k,4k")
    p.add_argument("--rounds", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    kernels.load()
    build_at(args.against, SOURCES[args.op])
    current, other = getattr(torch.ops.crushkv, args.op), getattr(torch.ops.crushkv_ab, args.op)
    print(f"{args.op}: current vs {args.against}, {args.threads} threads, median of {args.rounds} interleaved calls")
    for length in parse_lengths(args.lengths):
        call, extra = inputs(args.op, length)
        a, b = current(*call), other(*call)
        for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,), strict=True):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
        fns = {"current": functools.partial(current, *call), args.against: functools.partial(other, *call), **extra}
        times: dict[str, list[float]] = {name: [] for name in fns}
        for r in range(args.rounds):
            for name in fns if r % 2 else reversed(list(fns)):
                start = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - start)
        med = {name: statistics.median(t) * 1e6 for name, t in times.items()}
        cells = "  ".join(f"{name} {us:.0f} us" for name, us in med.items())
        print(f"L={length}: {cells}  current/other {med['current'] / med[args.against]:.3f}")


if __name__ == "__main__":
    main()
