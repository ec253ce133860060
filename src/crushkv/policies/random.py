"""``random``: uniformly random eviction (a floor every method should beat), seeded per layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from crushkv.policies.base import Host, register


@register
@dataclass
class Random(Host):
    """Random scores per KV head from a generator seeded with ``seed`` and the layer index."""

    name = "random"
    batchable = False  # one generator per layer
    seed: int = 0

    def head_scores(self, view) -> torch.Tensor:
        gen = view.generator(self.seed)
        b, h, length = view.positions.shape
        return torch.rand(b, h, 1, length, generator=gen).to(view.positions.device)
