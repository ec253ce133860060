"""``tier=int8|int4|int2``: the tokens a policy evicts are kept at low precision instead of being dropped.

MiKV ("no token left behind", arXiv 2402.18096) keeps evicted tokens at a few bits: attention still reaches them, at
a fraction of their bytes. One ``LowTier`` per compressed layer holds them, beside the layer's store:

* a token enters the tier when the layer's cut frees its slot (``CompressedLayer.keep``); padding and tokens that
  leave a sliding window are dropped as before;
* the tier is append-only: a demoted token is attended over but is no longer a candidate of the policy (its score
  is not updated, it is never promoted back or evicted again), which is what keeps the policy's budget meaning
  "full-precision tokens";
* keys are quantized per channel over groups of ``group`` consecutive slots of a row (KIVI's layout: keys have
  outlier channels that would take a whole per-token range, and per-token key ranges scored below dropping the
  tokens on RULER-4k), values per token in groups of ``group`` channels (asymmetric min/max, the arithmetic of
  ``crushkv.quant``). A row's last, incomplete key group (fewer than ``group`` tokens: the open group) stays at
  full precision until it fills, then is quantized as one group, so at most ``group - 1`` keys per row are held
  exactly; a prompt's cut demotes its tokens at once and fills all but the last group immediately;
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
        #: value scale and zero [B, H, capacity, channel groups]; key scale and zero [B, H, capacity / group, d]
        self.ranges: dict[str, torch.Tensor] = {}
        self.open: torch.Tensor | None = None  # [B, H, group, dk]: the keys of each row's open group, exact
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
        before = self.counts.clone()
        self.counts += freed.sum(-1)
        need = int(self.counts.max())
        self._reserve(need, freed)
        codes, scale, zero = quant.quantize_values(values[bi, hi, slot], self.bits, self.group, self.dtype)
        self.codes["value"][bi, hi, dest] = codes
        self.ranges["value_scale"][bi, hi, dest] = scale
        self.ranges["value_zero"][bi, hi, dest] = zero
        self._add_keys(before, bi, hi, dest, keys[bi, hi, slot])
        self.positions[bi, hi, dest] = positions[bi, hi, slot]
        self.valid[bi, hi, dest] = True
        self.hw = need

    def _add_keys(self, before, bi: torch.Tensor, hi: torch.Tensor, dest: torch.Tensor, keys: torch.Tensor) -> None:
        """New keys (``keys[i]`` for slot ``dest[i]`` of row ``(bi[i], hi[i])``; ``before``: the rows' counts without
        them) join their rows' open groups; every group that fills is quantized per channel and leaves the open
        buffer."""
        g = self.group
        b, h = self.counts.shape
        base = (before // g) * g  # first slot of each row's open group
        span = int((self.counts - base).max())
        groups = -(-span // g)
        staged = torch.zeros(b, h, groups * g, self.dims[0], dtype=self.dtype, device=keys.device)
        staged[:, :, :g] = self.open
        staged[bi, hi, dest - base[bi, hi]] = keys
        filled = self.counts // g - base // g  # groups completed by this add, per row
        live = torch.arange(groups * g, device=keys.device) < (self.counts - base)[..., None]
        packed, scale, zero = quant.quantize_keys(
            staged.view(b, h, groups, g, -1), self.bits, self.dtype, live.view(b, h, groups, g)
        )
        rows_b, rows_h, j = (torch.arange(groups, device=keys.device) < filled[..., None]).nonzero(as_tuple=True)
        first = base[rows_b, rows_h] // g + j  # the completed groups' indices
        self.ranges["key_scale"][rows_b, rows_h, first] = scale[rows_b, rows_h, j]
        self.ranges["key_zero"][rows_b, rows_h, first] = zero[rows_b, rows_h, j]
        slots = first[:, None] * g + torch.arange(g, device=keys.device)
        self.codes["key"][rows_b[:, None], rows_h[:, None], slots] = packed[rows_b, rows_h, j]
        # what is left in each row's last group becomes its open group
        rest = (filled * g)[..., None] + torch.arange(g, device=keys.device)
        self.open = staged.gather(2, rest.clamp(max=groups * g - 1)[..., None].expand(b, h, g, self.dims[0]))

    def _reserve(self, need: int, like: torch.Tensor) -> None:
        if need <= self.capacity:
            return
        b, h = self.counts.shape
        capacity = -(-grown(need) // self.group) * self.group  # whole key groups
        device = like.device

        def widen(t: torch.Tensor | None, *shape, dtype, fill=0) -> torch.Tensor:
            out = torch.full((b, h, capacity, *shape), fill, dtype=dtype, device=device)
            if t is not None:
                out[:, :, : self.capacity] = t
            return out

        for name, d in zip(("key", "value"), self.dims, strict=True):
            self.codes[name] = widen(self.codes.get(name), quant.packed_width(d, self.bits), dtype=torch.uint8)
        groups = quant.value_groups(self.dims[1], self.group)[1]
        for part in ("_scale", "_zero"):
            self.ranges["value" + part] = widen(self.ranges.get("value" + part), groups, dtype=self.dtype)
        # per-channel key ranges, one per group of ``group`` slots
        for part in ("_scale", "_zero"):
            old = self.ranges.get("key" + part)
            out = torch.zeros(b, h, capacity // self.group, self.dims[0], dtype=self.dtype, device=device)
            if old is not None:
                out[:, :, : old.shape[2]] = old
            self.ranges["key" + part] = out
        if self.open is None:
            self.open = torch.zeros(b, h, self.group, self.dims[0], dtype=self.dtype, device=device)
        self.positions = widen(self.positions, dtype=torch.long, fill=-1)
        self.valid = widen(self.valid, dtype=torch.bool, fill=False)
        self.capacity = capacity

    def dense(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(keys, values, positions, valid)`` of slots ``0..hw-1``: ``[B, H, hw, d]`` dequantized (one layer's
        worth, freed after the pass), ``[B, H, hw]`` positions and flags."""
        n = self.hw
        g = self.group
        slot = torch.arange(n, device=self.counts.device)
        group = slot // g
        codes = quant.unpack(self.codes["key"][:, :, :n], self.bits, self.dims[0])
        scale = self.ranges["key_scale"].index_select(2, group)
        zero = self.ranges["key_zero"].index_select(2, group)
        keys = quant.dequantize(codes, scale, zero, self.dtype)
        exact = (slot >= ((self.counts // g) * g)[..., None]) & (slot < self.counts[..., None])  # open groups
        keys = torch.where(exact[..., None], self.open.index_select(2, slot % g), keys)
        values = quant.dequantize_values(
            self.codes["value"][:, :, :n],
            self.ranges["value_scale"][:, :, :n],
            self.ranges["value_zero"][:, :, :n],
            self.bits,
            self.group,
            self.dims[1],
            self.dtype,
        )
        return keys, values, self.positions[:, :, :n], self.valid[:, :, :n]

    def map_batch(self, fn) -> None:
        if self.counts is None:
            return
        self.counts, self.positions, self.valid = fn(self.counts), fn(self.positions), fn(self.valid)
        self.codes = {k: fn(v) for k, v in self.codes.items()}
        self.ranges = {k: fn(v) for k, v in self.ranges.items()}
        self.open = fn(self.open)

    def held_positions(self) -> torch.Tensor:
        """``[B, H, max held]`` positions per row, ascending, ``-1`` where a row holds fewer."""
        big = torch.iinfo(torch.long).max
        n = self.hw
        ordered = torch.where(self.valid[:, :, :n], self.positions[:, :, :n], big).sort(-1).values
        return torch.where(ordered == big, -1, ordered)

    def logical_nbytes(self) -> int:
        """Bytes of what the tokens held need (without the spare capacity): every token's key and value codes and
        value ranges, one per-channel key range per completed group, and the open groups' exact keys."""
        if self.counts is None:
            return 0

        def row_bytes(t: torch.Tensor) -> int:
            return t[0, 0, 0].numel() * t.element_size()

        per_token = sum(
            row_bytes(t) for t in (*self.codes.values(), self.ranges["value_scale"], self.ranges["value_zero"])
        )
        per_group = row_bytes(self.ranges["key_scale"]) + row_bytes(self.ranges["key_zero"])
        tokens, full = int(self.counts.sum()), int((self.counts // self.group).sum())
        return tokens * per_token + full * per_group + (tokens - full * self.group) * row_bytes(self.open)

    def nbytes(self, float_bytes: int | None = None) -> int:
        """Bytes of the tier's codes, ranges and open-group keys (the capacity it holds, as for the stores)."""
        parts = (*self.codes.values(), *self.ranges.values(), *(() if self.open is None else (self.open,)))
        return sum(storage_nbytes(t, float_bytes) for t in parts)
