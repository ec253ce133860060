"""The parametrised policy matrix: every registered policy, alone and under KVCrush, built from the registry."""

from __future__ import annotations

import dataclasses

from crushkv.policies import REGISTRY

#: KVCrush settings exercised on top of every host
CRUSH_VARIANTS = (
    "crush=4,anchor=random",
    "crush=0.34,anchor=mean,pick=ovg",
    "crush=4,anchor=alternate,granularity=block,block=2",
)


def small_spec(name: str, budget: int | float, phase: str | None = None, crush: str | None = None) -> str:
    """A spec for tiny models: sink 2, recent 4 (window 4 where the policy has one)."""
    cls = REGISTRY[name]
    if not cls.compresses:
        return name
    fields = {f.name for f in dataclasses.fields(cls)}
    parts = [f"budget={budget}", "sink=2", "recent=4"]
    if "window" in fields:
        parts.append("window=4")
    if phase:
        parts.append(f"phase={phase}")
    head = f"{name}+kvcrush" if crush else name
    return f"{head}:{','.join(parts)}" + (f",{crush}" if crush else "")


def all_specs(budget: int | float, phase: str | None = None) -> list[str]:
    """Every host policy plus every host under each KVCrush variant."""
    specs = [small_spec(name, budget, phase) for name in sorted(REGISTRY)]
    for name in sorted(REGISTRY):
        if REGISTRY[name].compresses:
            specs += [small_spec(name, budget, phase, crush) for crush in CRUSH_VARIANTS]
    return specs
