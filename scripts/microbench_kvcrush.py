"""Micro-benchmark of one KVCrush token selection (host top-k, signatures, anchor, Hamming, buckets, indices).

Times ``KVCrush.select`` at the shapes a generation with ``interval=auto`` produces: the prompt-time cut of one layer
(``[1, Hk, L]``, what ``defer_bytes=0`` runs), of the layers the default prompt batching cuts together (as many as
fit ``DEFER_MAX_BYTES`` of uncompressed fp32 K/V), and a batched decode-time cut of all layers at once
(``[layers, Hk, budget + interval]``); the last column is the time per layer.
Scores are heavy-tailed random values (like accumulated attention). ``--against REV`` also times the selection with
``crush.py``/``selection.py`` as of a git revision, in the same interleaved rounds (A/B); a matmul runs between calls
so caches and threads are as busy as inside a generation. Shapes default to SmolLM2-135M (30 layers, 9 query heads,
3 KV heads). Usage: ``python scripts/microbench_kvcrush.py [--lengths 1k,2k,4k] [--rounds 200] [--against REV]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager
from types import SimpleNamespace

import torch
from revision import module_at

import crushkv.policies.kvcrush as kvcrush_module
from crushkv.bench.commands import parse_lengths
from crushkv.layer_stack import DEFER_MAX_BYTES
from crushkv.policies import parse_policy


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
    p.add_argument("--against", help="git revision whose crush.py/selection.py are timed too (A/B)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    policy = parse_policy(args.policy)
    variants = {"current": {}}
    if args.against:
        variants[args.against] = load_revision(args.against)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.policy}, {args.rounds} interleaved rounds")
    names = list(variants)
    print("| length | cut | shape | " + " | ".join(f"{n} us (median)" for n in names) + " | us per layer |")
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
            layer = stand_in_layer(batch, args.kv_heads, args.heads // args.kv_heads, slots, length)
            times = {name: [] for name in names}
            for _ in range(args.rounds):
                for name in names:
                    busy @ busy
                    with swapped(variants[name]):
                        start = time.perf_counter()
                        policy.keep_mask(layer, budget)
                        times[name].append((time.perf_counter() - start) * 1e6)
            cells = " | ".join(f"{statistics.median(times[n]):.0f}" for n in names)
            per_layer = statistics.median(times[names[0]]) / batch
            print(f"| {length} | {cut} | {batch}x{args.kv_heads}x{slots} | {cells} | {per_layer:.0f} |")


def stand_in_layer(batch: int, kv_heads: int, group: int, slots: int, context: int) -> SimpleNamespace:
    """A ``LayerView`` with what ``KVCrush.keep_mask`` reads: tokens in slot order (as at the prompt cut), H2O's
    accumulated scores, the context length."""
    gen = torch.Generator().manual_seed(0)
    score = torch.rand(batch, kv_heads, group, slots, generator=gen) ** 4
    anchors: dict = {}

    def per_layer(key, make):
        anchors.setdefault(key, make(0))
        return anchors[key].expand(batch, *anchors[key].shape)

    return SimpleNamespace(
        positions=torch.arange(slots).expand(batch, kv_heads, slots),
        valid=torch.ones(batch, kv_heads, slots, dtype=torch.bool),
        start=torch.zeros(batch, dtype=torch.long),
        seen=slots,
        state={"score": score, "count": torch.ones(batch, kv_heads, slots)},
        num_kv_heads=kv_heads,
        context_lengths=(context,) * batch,
        aligned=True,
        order=None,
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
