"""A ``LayerView`` over given scores, for pure selection tests (no model, no cache)."""

from __future__ import annotations

import torch

from crushkv.selection import order_keys


class FakeLayer:
    """Per-query-head scores ``[B, H, G, L]`` and row validity ``[B, L]`` for tokens at positions ``0..L-1``.

    ``perm``: ``[B, H, L]`` (or ``[L]``) slot permutation: the token at position ``p`` lives in slot ``perm^-1[p]``,
    as after in-place writes and compaction. Same tokens, other slots: selections must keep the same positions.
    """

    def __init__(
        self, scores: torch.Tensor, valid: torch.Tensor, layer_idx: int = 0, perm: torch.Tensor | None = None
    ) -> None:
        b, h, g, length = scores.shape
        positions = torch.arange(length).expand(b, h, length)
        valid = valid[:, None, :].expand(b, h, length)
        keys = scores.mean(2)[..., None].expand(b, h, length, 4)
        self.aligned, self._ordered = True, True
        if perm is not None:
            perm = perm.expand(b, h, length)
            self.aligned = bool((perm == perm[:, :1]).all())
            self._ordered = bool((perm == torch.arange(length)).all())
            scores = scores.gather(-1, perm[:, :, None].expand(b, h, g, length))
            positions, valid = positions.gather(-1, perm), valid.gather(-1, perm)
            keys = keys.gather(2, perm[..., None].expand(b, h, length, 4))
        self.positions, self.valid = positions.contiguous(), valid.contiguous()
        # every host's slot-aligned state names, filled from the given scores
        vnorm = scores.mean(2, keepdim=True) + 1
        self.state = {
            "score": scores,
            "last": scores,
            "count": torch.ones(b, h, length),
            "ea_logits": scores,
            "ea_vnorm": vnorm,
            "kvzip": scores.mean(2),
        }
        self._keys = keys.contiguous()
        self.seen = length
        first_valid = valid[:, 0].gather(-1, positions[:, 0].argsort(-1)).long().argmax(-1)
        self.start = first_valid
        self.context_lengths = tuple(int(n) for n in valid[:, 0].sum(-1).tolist())
        self.layer_idx = layer_idx
        self.rank = 0
        self.num_compressed_layers = 1
        self.extras: dict = {}

    @property
    def num_kv_heads(self) -> int:
        return self.positions.shape[1]

    @property
    def order(self):
        return None if self._ordered else order_keys(self.positions)

    def cached_keys(self) -> torch.Tensor:
        return self._keys

    def cached_values(self) -> torch.Tensor:
        return self._keys.flip(-1) * 2  # a value per token that is not its key

    def per_layer(self, key, make):
        if key not in self.extras:
            self.extras[key] = make(self.layer_idx)
        return self.extras[key].expand(self.positions.shape[0], *self.extras[key].shape)

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    def kept_positions(self, keep: torch.Tensor) -> list[list[list[int]]]:
        """Sorted positions of the kept slots, per (batch row, head)."""
        b, h, _ = keep.shape
        return [[sorted(self.positions[i, j][keep[i, j]].tolist()) for j in range(h)] for i in range(b)]
