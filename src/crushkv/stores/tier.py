"""``tier=int8|int4|int2``: the tokens a policy evicts are kept at low precision instead of being dropped.

MiKV ("no token left behind", arXiv 2402.18096) keeps evicted tokens at a few bits: attention still reaches them, at
a fraction of their bytes. One ``LowTier`` per compressed layer holds them, beside the layer's store:

* a token enters the tier when the layer's cut frees its slot (``CompressedLayer.keep``); padding and tokens that
  leave a sliding window are dropped as before;
* the tier is append-only: a demoted token is attended over but is no longer a candidate of the policy (its score
  is not updated, it is never promoted back or evicted again), which is what keeps the policy's budget meaning
  "full-precision tokens";
* keys and values are both quantized per token, in groups of ``group`` channels (asymmetric min/max, the arithmetic
  of ``crushkv.quant``). KIVI's per-channel key groups need ``group`` consecutive tokens, and evicted tokens arrive
  one by one in no order, so per-token ranges are what an append-only tier can hold exactly;
* each (batch row, KV head) fills its own rows of slots (ragged: per-head budgets free different counts).

Attention reads ``dense()``: the tier's tokens dequantized (one layer's worth at a time), with their positions
and validity, which ``CrushCache.attend`` puts after the layer's own slots.
"""

from __future__ import annotations

import torch

from crushkv import quant
from crushkv.stores.base import grown, storage_nbytes


class LowTier:
    """Append-only low-precision slots of one layer: ``[B, H, capacity]`` rows of per-token quantized K/V."""

    def __init__(self, bits: int, group: int) -> None:
        self.bits, self.group = bits, group
        self.capacity = 0
        self.hw = 0  # slots [0, hw) of some row hold a token
        self.counts: torch.Tensor | None = None  # [B, H] tokens per row
        self.positions: torch.Tensor | None = None  # [B, H, capacity]
        self.valid: torch.Tensor | None = None
        self.codes: dict[str, torch.Tensor] = {}  # key/value codes [B, H, capacity, d*b/8]
        self.ranges: dict[str, torch.Tensor] = {}  # key/value scale and zero [B, H, capacity, groups]
        self.dims = (0, 0)
        self.dtype = torch.float32

    def __len__(self) -> int:
        return self.hw

    def add(self, freed: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Demote the slots where ``freed`` ``[B, H, n]`` is True: their ``positions`` and ``keys``/``values``
        ``[B, H, n, d]`` (what the layer's store held) are quantized into the next free slots of each row."""
        b, h = freed.shape[:2]
        if self.counts is None:
            self.counts = torch.zeros(b, h, dtype=torch.long, device=freed.device)
            self.dims, self.dtype = (keys.shape[-1], values.shape[-1]), keys.dtype
        bi, hi, slot = freed.nonzero(as_tuple=True)
        if not len(slot):
            return
        rank = freed.long().cumsum(-1) - 1  # the order of each freed slot within its row
        dest = self.counts[bi, hi] + rank[bi, hi, slot]
        self.counts += freed.sum(-1)
        need = int(self.counts.max())
        self._reserve(need, freed)
        for name, x in (("key", keys), ("value", values)):
            codes, scale, zero = quant.quantize_values(x[bi, hi, slot], self.bits, self.group, self.dtype)
            self.codes[name][bi, hi, dest] = codes
            self.ranges[name + "_scale"][bi, hi, dest] = scale
            self.ranges[name + "_zero"][bi, hi, dest] = zero
        self.positions[bi, hi, dest] = positions[bi, hi, slot]
        self.valid[bi, hi, dest] = True
        self.hw = need

    def _reserve(self, need: int, like: torch.Tensor) -> None:
        if need <= self.capacity:
            return
        b, h = self.counts.shape
        capacity = grown(need)
        device = like.device

        def widen(t: torch.Tensor | None, *shape, dtype, fill=0) -> torch.Tensor:
            out = torch.full((b, h, capacity, *shape), fill, dtype=dtype, device=device)
            if t is not None:
                out[:, :, : self.capacity] = t
            return out

        for name, d in zip(("key", "value"), self.dims, strict=True):
            groups = quant.value_groups(d, self.group)[1]
            self.codes[name] = widen(self.codes.get(name), quant.packed_width(d, self.bits), dtype=torch.uint8)
            for part in ("_scale", "_zero"):
                self.ranges[name + part] = widen(self.ranges.get(name + part), groups, dtype=self.dtype)
        self.positions = widen(self.positions, dtype=torch.long, fill=-1)
        self.valid = widen(self.valid, dtype=torch.bool, fill=False)
        self.capacity = capacity

    def dense(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(keys, values, positions, valid)`` of slots ``0..hw-1``: ``[B, H, hw, d]`` dequantized (one layer's
        worth, freed after the pass), ``[B, H, hw]`` positions and flags."""
        n = self.hw
        out = []
        for name, d in zip(("key", "value"), self.dims, strict=True):
            x = quant.dequantize_values(
                self.codes[name][:, :, :n],
                self.ranges[name + "_scale"][:, :, :n],
                self.ranges[name + "_zero"][:, :, :n],
                self.bits,
                self.group,
                d,
                self.dtype,
            )
            out.append(x)
        return out[0], out[1], self.positions[:, :, :n], self.valid[:, :, :n]

    def map_batch(self, fn) -> None:
        if self.counts is None:
            return
        self.counts, self.positions, self.valid = fn(self.counts), fn(self.positions), fn(self.valid)
        self.codes = {k: fn(v) for k, v in self.codes.items()}
        self.ranges = {k: fn(v) for k, v in self.ranges.items()}

    def held_positions(self) -> torch.Tensor:
        """``[B, H, max held]`` positions per row, ascending, ``-1`` where a row holds fewer."""
        big = torch.iinfo(torch.long).max
        n = self.hw
        ordered = torch.where(self.valid[:, :, :n], self.positions[:, :, :n], big).sort(-1).values
        return torch.where(ordered == big, -1, ordered)

    def logical_nbytes(self) -> int:
        """Bytes of the codes and ranges of the tokens held (without the spare capacity)."""
        per_token = sum(t[0, 0, 0].numel() * t.element_size() for t in (*self.codes.values(), *self.ranges.values()))
        return int(self.counts.sum()) * per_token if self.counts is not None else 0

    def nbytes(self, float_bytes: int | None = None) -> int:
        """Bytes of the tier's codes and ranges (the capacity it holds, as for the stores)."""
        return sum(storage_nbytes(t, float_bytes) for t in (*self.codes.values(), *self.ranges.values()))
