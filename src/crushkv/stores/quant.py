"""``quant=int2|int4|int8`` (on ``store=dense``): KIVI-style quantized slots with a full-precision residual.

The layer still decides every slot (lowest free slot, compaction), so this store keeps a slot-indexed layout like
the dense store, one row of bytes per slot, and adds where each slot's value lives:

* ``key_codes``/``value_codes`` ``[B, H, capacity, d*b/8]``: the slot's packed codes (packed along channels, so a
  slot is one independent row: ``move`` copies it exactly);
* ``value_scale``/``value_zero`` ``[B, H, capacity, groups]``: values are quantized per token, so their range
  travels with the slot;
* keys are quantized per channel over a group of ``group`` consecutive tokens; the group's ``[d]`` range lives in a
  group table ``key_scale``/``key_zero`` ``[B, H, rows, d]`` and each slot names its row in ``where``;
* the residual: the newest tokens sit at full precision in a FIFO ``fp_keys``/``fp_values`` ``[B, H, R + G, d]``
  (arrival order, ``fp_owner`` = the slot of each entry); ``where = -1 - i`` marks a slot whose token is entry
  ``i``. When the FIFO holds ``residual + group`` tokens, its oldest ``group`` are quantized as one key group.

Every pass writes the same number of tokens to every row, so the FIFO fill and group boundaries are the same for
all rows: a key group covers positions ``[g * group, (g + 1) * group)``.

Eviction composes without re-quantizing anything: a freed slot (``evicted``) forgets its group row or FIFO entry;
the group's range stays in the table while any slot of any row still uses it, so the group's other tokens read back
exactly what they read before. A FIFO entry whose slot was freed or rewritten is dead: it sets no range and is
dropped when its group is quantized. Group rows nobody uses are reused by the next group and compacted away by
``fit`` (after a cut).

Decode attention reads the packed slots in place (``page_view``, the compiled ``quant_attend``: each slot dequantized
where it is used, never the layer). Otherwise attention reads ``dense(n, scratch=True)``: the first ``n`` slots
dequantized into one buffer shared by the cache's layers (one layer's worth), the residual overlaid at full
precision.
"""

from __future__ import annotations

import torch

from crushkv import quant
from crushkv.stores.base import QuantSlots, grown, storage_nbytes

#: ``where`` of a slot holding nothing (free, evicted or padding slots that were released)
EMPTY = torch.iinfo(torch.int16).min
#: group rows are named by int16 ``where`` entries
MAX_GROUP_ROWS = torch.iinfo(torch.int16).max


class QuantScratch:
    """Dequantization buffers shared by one cache's layers (they attend one after the other), plus which layer's
    contents they hold, so a pass that asks twice (kernel pages, then a fallback) dequantizes once. Reused from
    step to step: fresh multi-megabyte tensors per layer would cost page faults on every decode step."""

    def __init__(self) -> None:
        self.flat: dict[str, torch.Tensor] = {}
        self.holder: tuple[int, int, int] | None = None

    def buffer(self, name: str, numel: int, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A flat buffer of at least ``numel`` elements (``dtype``, else ``like``'s), valid until the next call."""
        dtype = dtype or like.dtype
        current = self.flat.get(name)
        if current is None or current.numel() < numel or current.dtype != dtype or current.device != like.device:
            current = self.flat[name] = like.new_empty(grown(numel), dtype=dtype)
            if name in ("keys", "values"):
                self.holder = None
        return current[:numel]

    def buffers(self, b: int, h: int, n: int, like_k: torch.Tensor, like_v: torch.Tensor):
        """``[B, H, n + 1, d]`` key and value buffers (row ``n`` of each takes the dead residual entries)."""
        dk, dv = like_k.shape[-1], like_v.shape[-1]
        keys = self.buffer("keys", b * h * (n + 1) * dk, like_k).view(b, h, n + 1, dk)
        values = self.buffer("values", b * h * (n + 1) * dv, like_v).view(b, h, n + 1, dv)
        return keys, values


class QuantStore:
    name = "quant"
    dense_is_a_view = False  # the prompt pass attends over its own full-precision tensors, as KIVI's prefill does

    def __init__(self, bits: int, group: int, residual: int, scratch: QuantScratch) -> None:
        self.bits, self.group, self.residual = bits, group, residual
        self.scratch = scratch
        self.capacity = 0
        self.count = 0  # FIFO entries in use (the same for every row)
        self.version = 0  # bumped by every change, so the scratch knows whether it still holds this layer

    # ------------------------------------------------------------------ layout
    def adopt(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        b, h, length, dk = keys.shape
        dv = values.shape[-1]
        self.dtype = keys.dtype
        self.value_size, groups = quant.value_groups(dv, self.group)
        kw, vw = quant.packed_width(dk, self.bits), quant.packed_width(dv, self.bits)
        self.key_codes = keys.new_zeros(b, h, length, kw, dtype=torch.uint8)
        self.value_codes = keys.new_zeros(b, h, length, vw, dtype=torch.uint8)
        self.value_scale = values.new_zeros(b, h, length, groups)
        self.value_zero = values.new_zeros(b, h, length, groups)
        self.where = torch.full((b, h, length), EMPTY, dtype=torch.int16, device=keys.device)
        fifo = self.residual + self.group
        self.fp_keys, self.fp_values = keys.new_zeros(b, h, fifo, dk), values.new_zeros(b, h, fifo, dv)
        self.fp_owner = torch.full((b, h, fifo), -1, dtype=torch.long, device=keys.device)
        self.key_scale, self.key_zero = keys.new_zeros(b, h, 0, dk), keys.new_zeros(b, h, 0, dk)
        self.capacity, self.count = length, 0
        # KIVI's prefill: whole groups of the oldest tokens are quantized at once, leaving residual..residual+G-1
        quantized = max(0, length - self.residual) // self.group * self.group
        if quantized:
            g = quantized // self.group
            grouped = keys[:, :, :quantized].reshape(b, h, g, self.group, dk)
            codes, self.key_scale, self.key_zero = quant.quantize_keys(grouped, self.bits, self.dtype)
            self.key_codes[:, :, :quantized] = codes.view(b, h, quantized, kw)
            self._store_values(slice(0, quantized), values[:, :, :quantized])
            rows = torch.arange(quantized, device=keys.device) // self.group
            self.where[:, :, :quantized] = rows.to(torch.int16)
        slots = torch.arange(quantized, length, device=keys.device).expand(b, h, length - quantized)
        self._append(slots, keys[:, :, quantized:], values[:, :, quantized:])

    def _store_values(self, index, values: torch.Tensor) -> None:
        codes, scale, zero = quant.quantize_values(values, self.bits, self.group, self.dtype)
        self.value_codes[:, :, index], self.value_scale[:, :, index], self.value_zero[:, :, index] = codes, scale, zero

    def reserve(self, capacity: int) -> None:
        if capacity > self.capacity:
            self._resize(grown(capacity))

    def _resize(self, capacity: int) -> None:
        """Slot arrays of ``capacity`` slots holding the first ``min(capacity, old)`` of the old ones."""
        keep = min(capacity, self.capacity)
        for name in ("key_codes", "value_codes", "value_scale", "value_zero", "where"):
            old = getattr(self, name)
            fill = EMPTY if name == "where" else 0
            new = old.new_full((*old.shape[:2], capacity, *old.shape[3:]), fill)
            new[:, :, :keep] = old[:, :, :keep]
            setattr(self, name, new)
        # residual entries of slots cut away are dead (a cut slot is free: the layer released it)
        self.fp_owner.masked_fill_(self.fp_owner >= capacity, -1)
        self.capacity = capacity
        self.version += 1

    # ------------------------------------------------------------------ tokens in, tokens out
    def write(self, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        done, q = 0, slots.shape[-1]
        fifo = self.fp_keys.shape[2]
        while done < q:  # in chunks the FIFO can take; each full group is quantized as soon as it forms
            step = min(q - done, fifo - self.count)
            part = slice(done, done + step)
            self._append(slots[..., part], keys[:, :, part], values[:, :, part])
            done += step
            while self.count >= fifo:
                self._quantize_oldest()

    def _append(self, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Put ``[B, H, c]`` new tokens at FIFO entries ``count .. count + c - 1`` and bind their slots to them."""
        c = slots.shape[-1]
        entries = slice(self.count, self.count + c)
        self.fp_keys[:, :, entries], self.fp_values[:, :, entries] = keys, values
        self.fp_owner[:, :, entries] = slots
        codes = -1 - torch.arange(self.count, self.count + c, device=slots.device, dtype=torch.int16)
        self.where.scatter_(-1, slots, codes.expand_as(slots))
        self.count += c
        self.version += 1

    def _live(self, count: int) -> torch.Tensor:
        """``[B, H, count]``: FIFO entries whose slot still holds them (not freed, rewritten or cut away)."""
        owner = self.fp_owner[:, :, :count]
        bound = self.where.gather(-1, owner.clamp(min=0))
        entries = torch.arange(count, device=owner.device).to(torch.int16)
        return (owner >= 0) & (bound == -1 - entries)

    def _quantize_oldest(self) -> None:
        """Quantize FIFO entries ``0 .. group - 1`` (keys as one per-channel group, values per token) into their
        slots, then shift the FIFO down by a group."""
        g = self.group
        b, h = self.where.shape[:2]
        live = self._live(g)
        codes, scale, zero = quant.quantize_keys(self.fp_keys[:, :, :g], self.bits, self.dtype, live)
        row = self._free_group_row()
        self.key_scale[:, :, row], self.key_zero[:, :, row] = scale, zero
        vcodes, vscale, vzero = quant.quantize_values(self.fp_values[:, :, :g], self.bits, self.group, self.dtype)
        flat = (torch.arange(b * h, device=live.device).view(b, h, 1) * self.capacity + self.fp_owner[:, :, :g])[live]
        self.key_codes.view(-1, self.key_codes.shape[-1])[flat] = codes[live]
        self.value_codes.view(-1, self.value_codes.shape[-1])[flat] = vcodes[live]
        self.value_scale.view(-1, self.value_scale.shape[-1])[flat] = vscale[live]
        self.value_zero.view(-1, self.value_zero.shape[-1])[flat] = vzero[live]
        self.where.view(-1)[flat] = row
        rest = self.count - g
        for fifo in (self.fp_keys, self.fp_values, self.fp_owner):
            fifo[:, :, :rest] = fifo[:, :, g : self.count].clone()
        self.fp_owner[:, :, rest:] = -1
        # entry i becomes entry i - g: where = -1 - i rises by g for every slot still in the FIFO
        shifted = (self.where > EMPTY) & (self.where <= -1 - g)
        self.where.add_(shifted.to(torch.int16) * g)
        self.count = rest
        self.version += 1

    def _free_group_row(self) -> int:
        """A group-table row no slot uses (the lowest), growing the table by 1/64 when every row is in use."""
        rows = self.key_scale.shape[2]
        if rows:
            used = self._used_rows()
            free = (~used).nonzero()
            if free.numel():
                return int(free[0])
        new = rows + max(1, rows // 64)
        if new > MAX_GROUP_ROWS:
            raise RuntimeError(f"more than {MAX_GROUP_ROWS} key groups in one layer: raise group= (now {self.group})")
        b, h, _, d = self.key_scale.shape
        for name in ("key_scale", "key_zero"):
            old = getattr(self, name)
            bigger = old.new_zeros(b, h, new, d)
            bigger[:, :, :rows] = old
            setattr(self, name, bigger)
        return rows

    def _used_rows(self) -> torch.Tensor:
        """``[rows]`` whether some slot of some row uses each group-table row."""
        rows = self.key_scale.shape[2]
        named = self.where[self.where >= 0].long()
        return torch.bincount(named, minlength=rows)[:rows] > 0

    def move(self, rows: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
        source, target = rows * self.capacity + src, rows * self.capacity + dst
        for name in ("key_codes", "value_codes", "value_scale", "value_zero"):
            flat = getattr(self, name).view(-1, getattr(self, name).shape[-1])
            flat.index_copy_(0, target, flat.index_select(0, source))
        where = self.where.view(-1)
        moved = where.index_select(0, source)
        where.index_copy_(0, target, moved)
        where.index_fill_(0, source, EMPTY)
        residual = (moved < 0) & (moved > EMPTY)  # tokens still at full precision: their FIFO entry follows them
        if bool(residual.any()):
            owner = self.fp_owner.view(-1, self.fp_owner.shape[-1])
            owner[rows[residual], (-1 - moved[residual]).long()] = dst[residual]
        self.version += 1

    def evicted(self, freed: torch.Tensor) -> None:
        """Forget the tokens of the freed slots ``[B, H, n]``: their group rows and FIFO entries lose a user."""
        self.where[..., : freed.shape[-1]].masked_fill_(freed, EMPTY)
        self.version += 1

    def fit(self, used: torch.Tensor, reserve: int) -> None:
        keep = int(used.max()) if used.numel() else 0
        target = keep + reserve
        if self.capacity > target + max(16, target // 32):
            self._resize(target)
        self._compact_groups()

    def _compact_groups(self) -> None:
        """Drop group-table rows no slot uses (after a cut whole groups die) and renumber the slots' rows."""
        used = self._used_rows()
        if bool(used.all()):
            return
        renumber = (used.cumsum(0) - 1).to(torch.int16)
        named = self.where >= 0
        self.where[named] = renumber[self.where[named].long()]
        self.key_scale = self.key_scale[:, :, used].contiguous()
        self.key_zero = self.key_zero[:, :, used].contiguous()
        self.version += 1

    # ------------------------------------------------------------------ reading
    def _dequantized(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots ``0..n-1`` of every row at the precision attention sees, in the shared scratch: ``[B, H, n + 1, d]``
        buffers (row ``n`` is scratch for dead residual entries)."""
        b, h = self.where.shape[:2]
        holder = (id(self), self.version, n)
        keys, values = self.scratch.buffers(b, h, n, self.fp_keys, self.fp_values)
        if self.scratch.holder == holder:
            return keys, values
        self._dequantize_keys(keys[:, :, :n], n)
        self._dequantize_values(values[:, :, :n], n)
        if self.count:  # the residual at full precision, each live entry into its slot (dead ones into row n)
            owner = self.fp_owner[:, :, : self.count]
            target = torch.where(self._live(self.count) & (owner < n), owner, n)
            for buffer, fifo in ((keys, self.fp_keys), (values, self.fp_values)):
                index = target[..., None].expand(b, h, self.count, fifo.shape[-1])
                buffer.scatter_(2, index, fifo[:, :, : self.count])
        self.scratch.holder = holder
        return keys, values

    def _codes(self, packed: torch.Tensor, d: int, name: str) -> torch.Tensor:
        """fp32 codes ``[B, H, n, d]`` of packed ``[B, H, n, w]`` bytes: one lookup per byte, in scratch buffers."""
        table = quant.code_table(self.bits, packed.device)
        index = self.scratch.buffer(f"{name}.bytes", packed.numel(), packed, torch.long)
        index.copy_(packed.reshape(-1))
        codes = self.scratch.buffer(f"{name}.codes", index.numel() * table.shape[1], table)
        torch.index_select(table, 0, index, out=codes.view(index.numel(), table.shape[1]))
        codes = codes.view(*packed.shape[:-1], packed.shape[-1] * table.shape[1])
        return codes if codes.shape[-1] == d else codes[..., :d]

    def _dequantize_keys(self, out: torch.Tensor, n: int) -> None:
        """Keys of slots ``0..n-1`` into ``out``: each slot's codes with its group row's per-channel range (rows
        looked up whole, one contiguous ``[d]`` copy per slot, instead of an element-wise gather)."""
        b, h, rows, dk = self.key_scale.shape
        if not rows:  # nothing quantized yet: every held token is in the residual
            out.zero_()
            return
        codes = self._codes(self.key_codes[:, :, :n], dk, "keys")
        flat = torch.arange(b * h, device=out.device).view(b, h, 1) * rows + self.where[:, :, :n].clamp(min=0)
        flat = flat.view(-1)
        ranges = []
        for name, table in (("scale", self.key_scale), ("zero", self.key_zero)):
            target = self.scratch.buffer(f"keys.{name}", flat.numel() * dk, table).view(flat.numel(), dk)
            ranges.append(torch.index_select(table.view(-1, dk), 0, flat, out=target).view(b, h, n, dk))
        scale, zero = ranges
        if self.dtype == torch.float32:
            torch.addcmul(zero, codes, scale, out=out)
        else:
            out.copy_(quant.dequantize(codes, scale, zero, self.dtype))

    def _dequantize_values(self, out: torch.Tensor, n: int) -> None:
        """Values of slots ``0..n-1`` into ``out``: codes with the slot's own per-token ranges."""
        dv = out.shape[-1]
        codes = self._codes(self.value_codes[:, :, :n], dv, "values")
        scale, zero = self.value_scale[:, :, :n], self.value_zero[:, :, :n]
        groups = scale.shape[-1]
        if self.dtype != torch.float32 or self.value_size * groups != dv:  # 16-bit models, a ragged channel group
            out.copy_(
                quant.dequantize_values(self.value_codes[:, :, :n], scale, zero, self.bits, self.group, dv, self.dtype)
            )
            return
        shape = (*out.shape[:3], groups, self.value_size)
        torch.addcmul(zero[..., None], codes.view(shape), scale[..., None], out=out.view(shape))

    def dense(self, n: int, scratch: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self._dequantized(n)
        keys, values = keys[:, :, :n], values[:, :, :n]
        if scratch:
            return keys, values
        return keys.clone(), values.clone()  # the caller keeps them past the next layer's attention

    def page_view(self, n: int) -> QuantSlots:
        """The packed slots in place (``quant_attend`` dequantizes one slot at a time where it reads it)."""
        return QuantSlots(
            self.key_codes,
            self.key_scale,
            self.key_zero,
            self.where,
            self.value_codes,
            self.value_scale,
            self.value_zero,
            self.fp_keys,
            self.fp_values,
            self.bits,
            self.value_size,
        )

    def map_batch(self, fn) -> None:
        for name in self._tensors():
            setattr(self, name, fn(getattr(self, name)).contiguous())
        self.version += 1

    @staticmethod
    def _tensors() -> tuple[str, ...]:
        return (
            "key_codes",
            "value_codes",
            "value_scale",
            "value_zero",
            "where",
            "fp_keys",
            "fp_values",
            "fp_owner",
            "key_scale",
            "key_zero",
        )

    def nbytes(self, float_bytes: int | None = None) -> int:
        """Packed codes of every slot, value ranges per slot, key ranges per group row, the slots' ``where``, and
        the full-precision residual FIFO with its owners."""
        if not self.capacity:
            return 0
        return sum(storage_nbytes(getattr(self, name), float_bytes) for name in self._tensors())
