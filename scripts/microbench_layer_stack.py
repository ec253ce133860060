"""Micro-benchmark of one decode-step selection, layer by layer vs all layers stacked (``crushkv.layer_stack``).

Shapes default to SmolLM2-135M at a 25 % budget of 4k: 30 layers, 3 KV heads x 3 query heads each, 1025 slots
(budget 1024 + the new token), random H2O scores. Usage:
``python scripts/microbench_layer_stack.py [--threads 2] [--slots 1025] [--layers 30] [--profile]``; prints
microseconds per layer; ``--profile`` adds the ``torch.profiler`` op table of the stacked KVCrush selection.
"""

from __future__ import annotations

import argparse
import time

import torch

from crushkv.layer import CompressedLayer
from crushkv.layer_stack import LayerStack
from crushkv.policies import parse_policy
from crushkv.stores import DenseStore


def make_layer(policy, index: int, slots: int, kv_heads: int, group: int) -> CompressedLayer:
    """A layer after a decode step: ``slots`` tokens in shuffled slots (in-place writes), random H2O scores."""
    layer = CompressedLayer(policy, index, index, 1, lambda k, v: DenseStore())
    kv = torch.rand(1, kv_heads, slots, 64)
    layer.update(kv, kv.clone())
    layer.begin_pass(None, slots)
    layer.prompt_done = True
    layer.context_lengths = (4 * (slots - 1),)
    layer._positions = torch.rand(1, kv_heads, slots).argsort(-1)
    layer.ordered = layer.aligned = False
    layer.set_state("score", torch.rand(1, kv_heads, group, slots))
    return layer


def per_call_us(fn, calls: int) -> float:
    for _ in range(max(1, calls // 10)):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--slots", type=int, default=1025)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--calls", type=int, default=100)
    p.add_argument("--profile", action="store_true", help="op breakdown of the stacked KVCrush selection")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    budget = args.slots - 1
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.layers} layers x {args.slots} slots")
    print("| policy | layer by layer, us per layer | stacked, us per layer | ratio |")
    print("|---|---:|---:|---:|")
    for spec in (f"h2o:budget={budget}", f"h2o+kvcrush:budget={budget},crush=0.25,anchor=mean"):
        policy = parse_policy(spec)
        layers = [make_layer(policy, i, args.slots, 3, 3) for i in range(args.layers)]

        def one_by_one(layers=layers, policy=policy) -> None:
            for layer in layers:
                policy.keep_mask(layer, budget)

        def stacked(layers=layers, policy=policy) -> None:
            policy.keep_mask(LayerStack(layers), budget)

        single = per_call_us(one_by_one, args.calls) / args.layers
        batch = per_call_us(stacked, args.calls) / args.layers
        print(f"| `{spec}` | {single:.0f} | {batch:.0f} | {single / batch:.1f}x |")
    if args.profile:
        with torch.profiler.profile() as prof:
            for _ in range(args.calls):
                stacked()
        print(f"\ntorch.profiler, stacked `{spec}`, {args.calls} calls (self CPU time; kthvalue = exact selections):")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))


if __name__ == "__main__":
    main()
