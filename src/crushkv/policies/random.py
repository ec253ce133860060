"""``random``: uniformly random eviction (a floor every method should beat), seeded per layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from crushkv.policies.base import Policy, register


@register
@dataclass
class Random(Policy):
    """Random scores per KV head from a generator seeded with ``seed`` and the layer index."""

    name = "random"
    batchable = False  # one generator per layer
    seed: int = 0

    def head_scores(self, layer) -> torch.Tensor:
        gen = layer.generator(self.seed)
        b, h, length = layer.positions.shape
        return torch.rand(b, h, 1, length, generator=gen).to(layer.positions.device)
