"""A stand-in for ``CompressedLayer`` carrying just what policies read, for pure selection tests."""

from __future__ import annotations

import torch


class FakeLayer:
    """Slots ``0..L-1`` with given per-query-head scores ``[B, H, G, L]`` and row validity ``[B, L]``."""

    def __init__(self, scores: torch.Tensor, valid: torch.Tensor, layer_idx: int = 0) -> None:
        b, h, _, length = scores.shape
        self.positions = torch.arange(length).expand(b, h, length)
        self.valid = valid[:, None, :].expand(b, h, length)
        self.state = {"score": scores, "last": scores, "count": torch.ones(b, h, length)}
        self.keys = scores.mean(2)[..., None].expand(b, h, length, 4).contiguous()
        self.extras: dict = {}
        self.context_length = length
        self.layer_idx = layer_idx
        self.rank = 0
        self.num_compressed_layers = 1

    @property
    def num_heads(self) -> int:
        return self.positions.shape[1]

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed)
