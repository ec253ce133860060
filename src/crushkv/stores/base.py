"""The K/V store seam: where one compressed layer's keys and values live.

A store holds ``B x H`` rows of slots (one row per batch element and KV head), one token's key and value per slot.
The layer owns the slot metadata (which slot holds which token, which are free) and decides where new tokens go and
which slots move when it compacts; the store only moves bytes and reports what it holds. So policies, selection and
attention never depend on the memory layout, and every store yields the same slots in the same order.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, runtime_checkable

import torch


class Pages(NamedTuple):
    """A store's memory as pages: ``keys``/``values`` ``[pages, page, d]``, ``table`` ``[B * H, width]`` page ids
    covering each row's slots in order (what a paged attention kernel reads)."""

    keys: torch.Tensor
    values: torch.Tensor
    table: torch.Tensor


class QuantSlots(NamedTuple):
    """A ``quant=`` store's slots as they are held (what ``quant_attend`` reads in place; ``stores/quant.py`` says
    what each tensor is): packed codes, ranges, ``where`` and the full-precision residual FIFO."""

    key_codes: torch.Tensor
    key_scale: torch.Tensor
    key_zero: torch.Tensor
    where: torch.Tensor
    value_codes: torch.Tensor
    value_scale: torch.Tensor
    value_zero: torch.Tensor
    fp_keys: torch.Tensor
    fp_values: torch.Tensor
    bits: int
    value_size: int


@runtime_checkable
class KVStore(Protocol):
    """Slot storage of one layer. ``rows``/``slots`` are ``[B, H, q]`` indices; flat ``row`` = ``b * H + h``."""

    #: slots per row writable without ``reserve``
    capacity: int
    #: ``dense`` returns views (no copy): the first pass reads the store instead of the pass's own tensors
    dense_is_a_view: bool

    def adopt(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Hold the first pass's ``[B, H, L, d]`` keys/values in slots ``0..L-1`` of every row."""

    def reserve(self, capacity: int) -> None:
        """Make at least ``capacity`` slots per row writable (geometric growth is the store's business)."""

    def write(self, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write ``[B, H, q, d]`` keys/values into ``slots`` ``[B, H, q]`` (every slot below ``capacity``)."""

    def move(self, rows: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy slot ``src[i]`` to ``dst[i]`` within flat row ``rows[i]`` (1-D tensors of equal length)."""

    def evicted(self, freed: torch.Tensor) -> None:
        """The layer freed the slots where ``freed`` ``[B, H, n]`` is True (their bytes stay until overwritten or
        cut by ``fit``); a store whose slots share storage (quantization groups) releases their share."""

    def fit(self, used: torch.Tensor, reserve: int) -> None:
        """Release storage above ``used`` ``[B, H]`` slots per row, keeping room for ``reserve`` more tokens."""

    def dense(self, n: int, scratch: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots ``0..n-1`` of every row as ``[B, H, n, d]`` keys and values (a view where the layout allows;
        ``scratch``: a store that copies may reuse one buffer, valid until the next scratch call)."""

    def page_view(self, n: int) -> Pages | QuantSlots:
        """What a decode kernel reads in place for slots ``0..n-1`` of every row (no copy): the pages holding
        them, or a quantized store's packed slots."""

    def map_batch(self, fn) -> None:
        """Apply a batch-dimension function (beam reorder, repeat, select) to every row."""

    def nbytes(self, float_bytes: int | None = None) -> int:
        """Bytes of K/V storage this layer holds (for a paged store: its pages in use plus its block table).
        ``float_bytes``: floating-point storage counted at that many bytes per element (see ``storage_nbytes``)."""


def storage_nbytes(t: torch.Tensor, float_bytes: int | None = None) -> int:
    """Bytes of ``t``'s storage; with ``float_bytes``, floating-point storage at that many bytes per element: what
    the same cache holds when the model computes in a 16-bit dtype (accuracy per byte is compared at 16 bits,
    the deployment norm, whatever dtype a CPU run computes in). Integer codes and tables count as they are."""
    n = t.untyped_storage().nbytes()
    if float_bytes is None or not t.is_floating_point():
        return n
    return n // t.element_size() * float_bytes


def grown(need: int) -> int:
    """Capacity after growing to hold ``need`` slots: 1/32 (at least 16 slots) above it, so appends amortise (one
    copy of the layer per ``need / 32`` appended tokens) while the slack stays near the 2 % users compare against."""
    return need + max(16, need // 32)
