"""The parametrised policy matrix: every registered policy, alone, under KVCrush and under Ada-KV, on every store,
built from the registries (a new policy or store is picked up without editing a list)."""

from __future__ import annotations

import dataclasses

from crushkv.policies import REGISTRY
from crushkv.stores import STORES

#: KVCrush settings exercised on top of every host
CRUSH_VARIANTS = (
    "crush=4,anchor=random",
    "crush=0.34,anchor=mean,pick=ovg",
    "crush=4,anchor=alternate,granularity=block,block=2",
)
#: Ada-KV settings exercised on top of every per-head host (alone and under KVCrush)
ADAKV_VARIANTS = ("floor=0.2", "floor=0.5,crush=4,anchor=mean")
#: spec suffix per store (small pages, so tiny models use several per head; ``page`` is also the compaction
#: granularity of both stores, so the two hold the same slots)
STORE_OPTIONS = {"dense": "store=dense,page=4", "paged": "store=paged,page=4"}
assert set(STORE_OPTIONS) == set(STORES), "a store without a matrix entry"
#: quantized slots (on the dense store) for tiny models: groups of 4 tokens / 4 channels and an 8-token residual, so
#: a 24-token prompt is mostly quantized and decoding quantizes a new key group every 4 tokens
QUANT_OPTIONS = {"int4": "quant=int4,group=4,residual=8", "int2": "quant=int2,group=4,residual=8"}
#: evicted tokens kept at low precision, quantized per token in groups of 4 channels
TIER_OPTIONS = {"int2": "tier=int2,group=4", "int8": "tier=int8"}


def small_spec(name: str, budget: int | float, phase: str | None = None, wrap: str | None = None, extra=None) -> str:
    """A spec for tiny models: sink 2, recent 4 (window 4 and lag 4 where the policy has them)."""
    cls = REGISTRY[name]
    if not cls.compresses:
        return name if extra is None else f"{name}:{extra}"
    fields = {f.name for f in dataclasses.fields(cls)}
    parts = [f"budget={budget}", "sink=2", "recent=4"]
    if "window" in fields:
        parts.append("window=4")
    if "lag" in fields:  # partitions of 4 tokens, so a 24-token prompt has several
        parts.append("lag=4")
    if "chunk" in fields:  # KVzip: several reconstruction passes over a 24-token prompt, no tokenizer
        parts += ["chunk=8", "prompt=none"]
    if phase and phase in cls.phases:
        parts.append(f"phase={phase}")
    head = name
    if wrap == "kvcrush":
        head = f"{name}+kvcrush"
    elif wrap is not None:  # an Ada-KV variant, under KVCrush when it names a crush share
        head = f"{name}+adakv+kvcrush" if "crush=" in wrap else f"{name}+adakv"
    options = [*parts, *([wrap] if wrap and wrap != "kvcrush" else []), *([extra] if extra else [])]
    return f"{head}:{','.join(options)}"


def all_specs(
    budget: int | float,
    phase: str | None = None,
    store: str | None = None,
    quant: str | None = None,
    tier: str | None = None,
) -> list[str]:
    """Every host policy, every host under each KVCrush variant, every per-head host under each Ada-KV variant
    (``quant``: a ``QUANT_OPTIONS`` entry, on the dense store; ``tier``: a ``TIER_OPTIONS`` entry, whereupon
    ``full``, which evicts nothing, is left out)."""
    options = [STORE_OPTIONS[store]] if store else []
    options += [QUANT_OPTIONS[quant]] if quant else []
    options += [TIER_OPTIONS[tier]] if tier else []
    extra = ",".join(options) or None
    names = [name for name in sorted(REGISTRY) if REGISTRY[name].compresses or not tier]
    specs = [small_spec(name, budget, phase, extra=extra) for name in names]
    for name in sorted(REGISTRY):
        cls = REGISTRY[name]
        if not cls.compresses:
            continue
        # whole blocks for all heads cannot sit on a host whose heads keep different counts (KVzip)
        variants = [c for c in CRUSH_VARIANTS if not (cls.ragged and "granularity=block" in c)]
        specs += [f"{small_spec(name, budget, phase, 'kvcrush', extra)},{crush}" for crush in variants]
        if not cls.shared:
            specs += [small_spec(name, budget, phase, variant, extra) for variant in ADAKV_VARIANTS]
    return specs
