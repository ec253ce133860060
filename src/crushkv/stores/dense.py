"""``store=dense``: one preallocated ``[B, H, capacity, d]`` buffer per layer, written in place.

New tokens go into freed slots (the layer picks them), so a decode step writes ``q`` rows and an eviction writes
nothing: no whole-layer copy per step. The buffer grows geometrically (``grown``) when a write needs more slots and
is reallocated smaller only when the kept set has shrunk far below it (after a prompt cut), so that

    capacity <= max kept per row + reserve + max(16, capacity / 32)

and right after a cut ``capacity = max kept + reserve`` (``reserve``: tokens appended before the next cut, the
policy's interval). Ragged rows (per-head budgets) pad to the largest row.
"""

from __future__ import annotations

import torch

from crushkv.stores.base import Pages, grown, storage_nbytes


class DenseStore:
    name = "dense"
    dense_is_a_view = True

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.capacity = 0

    def adopt(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        # projections hand over strided views, or views into a larger buffer: own a compact copy then
        self.keys, self.values = _compact(keys), _compact(values)
        self.capacity = keys.shape[2]

    def reserve(self, capacity: int) -> None:
        if capacity > self.capacity:
            self._reallocate(grown(capacity), self.capacity)

    def _reallocate(self, capacity: int, keep: int) -> None:
        """New buffers of ``capacity`` slots holding the first ``keep`` slots of the old ones."""
        b, h, _, d = self.keys.shape
        keys = self.keys.new_zeros(b, h, capacity, d)
        values = self.values.new_zeros(b, h, capacity, self.values.shape[-1])
        keys[:, :, :keep] = self.keys[:, :, :keep]
        values[:, :, :keep] = self.values[:, :, :keep]
        self.keys, self.values, self.capacity = keys, values, capacity

    def _flat(self, rows: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        return rows * self.capacity + slots

    def write(self, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        b, h, _ = slots.shape
        rows = torch.arange(b * h, device=slots.device).view(b, h, 1)
        flat = self._flat(rows, slots).reshape(-1)
        self.keys.view(-1, self.keys.shape[-1]).index_copy_(0, flat, keys.reshape(-1, keys.shape[-1]))
        self.values.view(-1, self.values.shape[-1]).index_copy_(0, flat, values.reshape(-1, values.shape[-1]))

    def move(self, rows: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
        for buffer in (self.keys, self.values):
            flat = buffer.view(-1, buffer.shape[-1])
            flat.index_copy_(0, self._flat(rows, dst), flat.index_select(0, self._flat(rows, src)))

    def evicted(self, freed: torch.Tensor) -> None:
        """Nothing to do: a slot's bytes are its own."""

    def fit(self, used: torch.Tensor, reserve: int) -> None:
        keep = int(used.max()) if used.numel() else 0
        target = keep + reserve
        if self.capacity > target + max(16, target // 32):
            self._reallocate(target, keep)

    def dense(self, n: int, scratch: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[:, :, :n], self.values[:, :, :n]

    def page_view(self, n: int) -> Pages:
        # one page per row: the row's whole buffer
        b, h, capacity, _ = self.keys.shape
        table = torch.arange(b * h, device=self.keys.device).view(b * h, 1)
        return Pages(self.keys.view(b * h, capacity, -1), self.values.view(b * h, capacity, -1), table)

    def map_batch(self, fn) -> None:
        self.keys, self.values = fn(self.keys).contiguous(), fn(self.values).contiguous()

    def nbytes(self, float_bytes: int | None = None) -> int:
        return sum(storage_nbytes(t, float_bytes) for t in (self.keys, self.values) if t is not None)


def _compact(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when it is contiguous and alone in its storage, else a compact copy."""
    if t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)
