"""``full``: no compression (the reference every comparison is made against)."""

from __future__ import annotations

from dataclasses import dataclass

from crushkv.policies.base import Host, register


@register
@dataclass
class Full(Host):
    """Keeps every token; the cache behaves like ``DynamicCache`` (useful as a baseline in the same code path)."""

    name = "full"
    compresses = False
    sink: int = 0
    recent: int = 0
