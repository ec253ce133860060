"""Micro-benchmark of one KVCrush token selection (host top-k, signatures, anchor, Hamming, buckets, indices).

Times ``KVCrush.keep_mask`` at the shapes a generation produces: the prompt-time cut of one layer (``[1, Hk, L]``,
what ``defer_bytes=0`` runs), of the layers the default prompt batching cuts together (as many as fit
``DEFER_MAX_BYTES`` of uncompressed fp32 K/V), and a batched decode-time cut of all layers at once
(``[layers, Hk, budget + interval]``, each KV head holding its own tokens in shuffled slots, as after per-head
evictions and in-place writes); the last column is the time per layer. ``kvcrush us`` is the part the bench reports
as KVCrush (the ``kvcrush`` profiler section: everything after the host's top-k).
Scores are heavy-tailed random values (like accumulated attention). ``--ops`` also times the PyTorch-op path
(``CRUSHKV_KERNELS=off``: no compiled ``kvcrush_reps``), ``--against REV`` the selection with
``crush.py``/``selection.py`` as of a git revision (ops path), in the same interleaved rounds (A/B); a matmul runs
between calls so caches and threads are as busy as inside a generation. Shapes default to SmolLM2-135M (30 layers,
9 query heads, 3 KV heads). Usage:
``python scripts/microbench_kvcrush.py [--lengths 1k,2k,4k] [--rounds 200] [--ops] [--against REV]``."""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager, nullcontext
from types import SimpleNamespace

import torch
from revision import module_at

import crushkv.policies.kvcrush as kvcrush_module
from crushkv import kernels
from crushkv.bench.commands import parse_lengths
from crushkv.layer_stack import DEFER_MAX_BYTES
from crushkv.policies import parse_policy
from crushkv.selection import order_keys


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="1k,2k,4k")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64, help="sizes the prompt batch (K/V bytes per layer)")
    p.add_argument("--policy", default="h2o+kvcrush:budget=0.25,crush=0.25,anchor=mean,interval=auto")
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ops", action="store_true", help="also time the PyTorch-op path (compiled kernel disabled)")
    p.add_argument("--against", help="git revision whose crush.py/selection.py are timed too (A/B, ops path)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    policy = parse_policy(args.policy)
    variants = {"current": ({}, False)}
    if args.ops:
        variants["ops"] = ({}, True)
    if args.against:
        variants[args.against] = (load_revision(args.against), True)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.policy}, {args.rounds} interleaved rounds")
    print(f"compiled kernels: {kernels.describe()}")
    names = list(variants)
    cells = " | ".join(f"{n}: keep_mask / kvcrush us (median)" for n in names)
    print(f"| length | cut | shape | {cells} | kvcrush us per layer |")
    print("|---:|---|---|" + "---:|" * len(names) + "---:|")
    busy = torch.randn(256, 256)
    for length in parse_lengths(args.lengths):
        budget = policy.host.budget_for(SimpleNamespace(context_lengths=(length,)))[0]
        interval = policy.interval_for(budget)
        together = max(1, min(args.layers, DEFER_MAX_BYTES // (2 * args.kv_heads * length * args.head_dim * 4)))
        cuts = [("prompt, one layer", 1, length)]
        if together > 1:
            cuts.append((f"prompt, {together} layers together", together, length))
        cuts.append(("decode, all layers", args.layers, budget + interval))
        for cut, batch, slots in cuts:
            layer = stand_in_layer(batch, args.kv_heads, args.heads // args.kv_heads, slots, length, cut[0] == "d")
            host_tokens, crush_tokens = policy.split(layer, budget)
            host_mask = policy.host.keep_mask(layer, host_tokens)
            times = {name: ([], []) for name in names}
            for _ in range(args.rounds):
                for name in names:
                    names_swapped, ops = variants[name]
                    with swapped(names_swapped), kernels.disabled() if ops else nullcontext():
                        busy @ busy
                        start = time.perf_counter()
                        policy.keep_mask(layer, budget)
                        times[name][0].append((time.perf_counter() - start) * 1e6)
                        busy @ busy
                        start = time.perf_counter()
                        policy._representatives(layer, host_mask, crush_tokens)
                        times[name][1].append((time.perf_counter() - start) * 1e6)
            cells = " | ".join(
                f"{statistics.median(times[n][0]):.0f} / {statistics.median(times[n][1]):.0f}" for n in names
            )
            per_layer = statistics.median(times[names[0]][1]) / batch
            print(f"| {length} | {cut} | {batch}x{args.kv_heads}x{slots} | {cells} | {per_layer:.1f} |")


def stand_in_layer(batch: int, kv_heads: int, group: int, slots: int, context: int, decode: bool) -> SimpleNamespace:
    """A ``LayerView`` with what ``KVCrush.keep_mask`` reads: H2O's accumulated scores and the context length; the
    prompt's tokens in slot order, or (``decode``) each KV head's own tokens of the ``context + 32`` seen so far (its
    sink, its recent window and a random choice of the rest) in shuffled slots."""
    gen = torch.Generator().manual_seed(0)
    score = torch.rand(batch, kv_heads, group, slots, generator=gen) ** 4
    anchors: dict = {}

    def per_layer(key, make):
        anchors.setdefault(key, make(0))
        return anchors[key].expand(batch, *anchors[key].shape)

    seen, positions, aligned = slots, torch.arange(slots).expand(batch, kv_heads, slots), True
    if decode:
        seen, edge = context + 32, 4 + 32
        middle = torch.rand(batch, kv_heads, seen - edge, generator=gen).argsort(-1)[..., : slots - edge] + 4
        kept = torch.cat(
            [
                torch.arange(4).expand(batch, kv_heads, 4),
                torch.arange(seen - 32, seen).expand(batch, kv_heads, 32),
                middle,
            ],
            -1,
        )
        shuffle = torch.rand(batch, kv_heads, slots, generator=gen).argsort(-1)
        positions, aligned = kept.gather(-1, shuffle).contiguous(), False
    return SimpleNamespace(
        positions=positions,
        valid=torch.ones(batch, kv_heads, slots, dtype=torch.bool),
        start=torch.zeros(batch, dtype=torch.long),
        seen=seen,
        state={"score": score, "count": torch.ones(batch, kv_heads, slots)},
        num_kv_heads=kv_heads,
        context_lengths=(context,) * batch,
        aligned=aligned,
        order=order_keys(positions) if decode else None,
        per_layer=per_layer,
    )


def load_revision(rev: str) -> dict[str, object]:
    """The functions the KVCrush module uses, from ``crush.py``/``selection.py`` as of git revision ``rev``."""
    selection = module_at(rev, "selection")
    crush = module_at(
        rev, "crush", lambda text: text.replace("from crushkv.selection import", "from selection_other import")
    )
    names = {}
    for attr in dir(kvcrush_module):
        for module in (crush, selection):
            if hasattr(module, attr) and callable(getattr(kvcrush_module, attr)):
                names[attr] = getattr(module, attr)
    return names


@contextmanager
def swapped(names: dict[str, object]):
    """Temporarily rebind names in the KVCrush policy module."""
    saved = {attr: getattr(kvcrush_module, attr) for attr in names}
    for attr, value in names.items():
        setattr(kvcrush_module, attr, value)
    try:
        yield
    finally:
        for attr, value in saved.items():
            setattr(kvcrush_module, attr, value)


if __name__ == "__main__":
    main()
