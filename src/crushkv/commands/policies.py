"""``crushkv policies``: list the registered policies, wrappers and stores with their spec keys and defaults."""

from __future__ import annotations

import argparse
import dataclasses

from crushkv.policies import REGISTRY, WRAPPERS, Host

#: keys every host shares: printed once, not per policy
SHARED_KEYS = ("budget", "sink", "recent", "phase", "interval", "store", "page", "quant", "group", "residual", "tier")

WRAPPER_NOTES = {
    "kvcrush": (
        "e.g. h2o+kvcrush:budget=512,crush=384,anchor=mean. Default phase=decode whatever the host's "
        "(snapkv+kvcrush cuts at every step; add phase=prefill for the paper's/vLLM's cut-once schedule)"
    ),
    "adakv": (
        "e.g. snapkv+adakv:budget=0.25,floor=0.2 (per-head hosts only; also snapkv+adakv+kvcrush). Per-head counts "
        "differ: store=paged holds each head's own count, store=dense pads every head to the largest"
    ),
}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("policies", help="list compression policies, wrappers and stores with their spec keys")
    p.set_defaults(func=run)


def _fields(cls: type, skip: tuple[str, ...] = ()) -> str:
    parts = []
    for f in dataclasses.fields(cls):
        if f.name == "host" or not f.init or f.name in skip:
            continue
        default = "" if f.default is dataclasses.MISSING else f.default
        parts.append(f"{f.name}={default}")
    return ", ".join(parts)


def _defaults(cls: type) -> str:
    """The shared keys whose default differs for this host (e.g. SnapKV's recent = its window)."""
    values = {f.name: f.default for f in dataclasses.fields(cls)}
    base = {f.name: f.default for f in dataclasses.fields(Host)}
    changed = [f"{k}={'window' if values[k] == -1 else values[k]}" for k in ("sink", "recent") if values[k] != base[k]]
    return ", ".join(changed)


def run(args: argparse.Namespace) -> int:
    print("hosts (the scoring method; one of them starts every spec):")
    for name in sorted(REGISTRY):
        cls = REGISTRY[name]
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        phase = "-" if not cls.compresses else cls.default_phase
        selection = "layer-shared" if cls.shared else "per KV head"
        print(f"  {name:10s} phase={phase:7s} {selection:12s} {doc}")
        parts = [f"keys: {_fields(cls, skip=SHARED_KEYS)}", f"defaults: {_defaults(cls)}"]
        parts = [p for p in parts if not p.endswith(": ")]
        if cls.compresses and parts:
            print(f"  {'':10s} {'; '.join(parts)}")
    print("  every compressing host also takes: budget (int tokens or float ratio of each row's prompt), sink=4,")
    print("  recent=32, phase=<its default>, interval=1|N|auto, store=dense|paged, page=16")
    print("  phase=prefill cuts the prompt once and appends generated tokens (the cache grows past the budget);")
    print("  phase=decode cuts back to the budget after every forward (every interval tokens)")
    print("\nwrappers (refine a host: host+adakv, host+kvcrush, host+adakv+kvcrush):")
    for name, cls in WRAPPERS.items():
        print(f"  +{name:9s} {WRAPPER_NOTES[name]}")
        print(f"  {'':10s} keys: {_fields(cls)}")
    print("\nstores (store= key): dense = one in-place buffer per layer (kept + interval slots); paged = pages of")
    print("page tokens per (layer, batch row, KV head) from one pool, pages in use only.")
    print("\nquantized slots (any policy, full included; store=dense): quant=none|int8|int4|int2, group=32,")
    print("  residual=128. KIVI: keys per channel over group tokens, values per token over group channels,")
    print("  asymmetric min/max; the newest residual..residual+group-1 tokens at full precision, the oldest group")
    print("  quantized as the window fills (never the whole cache). full:quant=int4 is plain KIVI-4;")
    print("  snapkv+kvcrush:budget=0.5,quant=int4 is eviction + KIVI: evicting a token inside a quantized group keeps")
    print("  its neighbours' values exact (the group's range stays while any of its tokens is kept).")
    print("  full takes store=, page=, quant=, group=, residual= only.")
    print("\nevicted tokens at low precision (any compressing policy, any store): tier=drop|int8|int4|int2")
    print("  (default drop). MiKV-style: what the policy evicts is kept at that precision (keys per channel over")
    print("  groups of group tokens, a row's last incomplete group exact; values per token over group channels)")
    print("  and still attended over; it is not scored again. budget= counts full-precision tokens;")
    print("  snapkv:budget=0.25,tier=int2 keeps 25 % at full precision and the other 75 % at 2 bits.")
    print("\nKVCrush's representatives at low precision (+kvcrush, phase=prefill): reps=full|int8|int4|int2")
    print("  (default full). The host's budget-crush tokens stay at full precision, the crush representatives")
    print("  are kept at that precision (the same low tier), the other evicted tokens are dropped; not with tier=.")
    print("  snapkv+kvcrush:budget=0.25,crush=0.75,phase=prefill,reps=int4: 6.25 % at 16 bits + 18.75 % at 4 bits.")
    return 0
