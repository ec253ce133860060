"""``store=paged,page=16``: fixed-size pages from one pool per cache, a block table per (batch row, KV head).

The layout a vLLM-style engine needs (docs/design.md): a page holds ``page`` consecutive slots of one KV head of
one layer; ``table[b * H + h, i]`` is the pool page holding that row's slots ``i*page .. (i+1)*page - 1``. Pages
are taken from the pool's free list when a write reaches an unmapped page and handed back by ``fit`` once the layer
has compacted a row below them, so a row holds ``ceil(used / page)`` pages: memory follows each head's own kept
count (per-head budgets really shrink it), and pages one batch row or layer gives back are reused by the others.

Attention reads the pages through the table (``dense`` gathers them into one ``[B, H, n, d]`` tensor per pass).
"""

from __future__ import annotations

import torch

from crushkv.stores.base import Pages, grown

#: table entry of an unmapped page: pool page 0 is never handed out, so gathers through it read zeros
NULL_PAGE = 0


class BlockPool:
    """Pages of ``page`` slots of one KV head, ``[pages, page, d]`` keys and values, with a free list."""

    def __init__(self, page: int, key_dim: int, value_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.page = page
        self.keys = torch.zeros(1, page, key_dim, dtype=dtype, device=device)
        self.values = torch.zeros(1, page, value_dim, dtype=dtype, device=device)
        self.free: list[int] = []  # lowest ids at the end, so allocations come from the bottom of the pool
        self.in_use = 0
        #: reused gather buffers for attention (layers attend one after the other): no fresh allocation per step
        self.scratch: dict[str, torch.Tensor] = {}

    @property
    def capacity(self) -> int:
        """Pages allocated in memory, the null page excluded."""
        return self.keys.shape[0] - 1

    @property
    def page_nbytes(self) -> int:
        return self.page * (self.keys.shape[-1] + self.values.shape[-1]) * self.keys.element_size()

    def page_bytes_at(self, float_bytes: int | None) -> int:
        """``page_nbytes`` with the keys and values at ``float_bytes`` per element (None: as held)."""
        return self.page_nbytes if float_bytes is None else self.page_nbytes // self.keys.element_size() * float_bytes

    def allocate(self, count: int) -> torch.Tensor:
        if count > len(self.free):
            self._grow(count - len(self.free))
        ids = self.free[len(self.free) - count :]
        del self.free[len(self.free) - count :]
        self.in_use += count
        return torch.tensor(ids[::-1], dtype=torch.long, device=self.keys.device)

    def release(self, ids: torch.Tensor) -> None:
        freed = ids.tolist()
        self.in_use -= len(freed)
        self.free.extend(freed)
        self.free.sort(reverse=True)

    def _grow(self, extra: int) -> None:
        old = self.keys.shape[0]
        new = old + max(extra, old // 4, 16)
        for name in ("keys", "values"):
            current = getattr(self, name)
            bigger = current.new_zeros(new, *current.shape[1:])
            bigger[:old] = current
            setattr(self, name, bigger)
        self.free = list(range(new - 1, old - 1, -1)) + self.free
        self.free.sort(reverse=True)

    def flat(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Row indices into the ``[pages * page, d]`` view of the pool."""
        return ids * self.page + offsets

    def reserved_nbytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in (self.keys, self.values))


class PagedStore:
    name = "paged"
    dense_is_a_view = False

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.page = pool.page
        self.table: torch.Tensor | None = None  # [B * H, width] pool page ids, NULL_PAGE where unmapped
        self.shape: tuple[int, int] = (0, 0)
        self.pages = 0  # pages of this layer in use (host count, no sync)

    @property
    def capacity(self) -> int:
        return 0 if self.table is None else self.table.shape[1] * self.page

    def adopt(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        b, h, length = keys.shape[:3]
        self.shape = (b, h)
        self.table = torch.full((b * h, 0), NULL_PAGE, dtype=torch.long, device=keys.device)
        self.reserve(length)
        self.write(torch.arange(length, device=keys.device).expand(b, h, length), keys, values)

    def reserve(self, capacity: int) -> None:
        width = -(-capacity // self.page)
        if width > self.table.shape[1]:
            extra = self.table.new_full((self.table.shape[0], width - self.table.shape[1]), NULL_PAGE)
            self.table = torch.cat([self.table, extra], dim=1)

    def _rows(self, slots: torch.Tensor) -> torch.Tensor:
        b, h = self.shape
        return torch.arange(b * h, device=slots.device).view(b, h, 1).expand_as(slots)

    def _map(self, rows: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Flat pool rows of ``(row, slot)`` pairs, mapping fresh pages for slots that reach unmapped ones."""
        column = slots // self.page
        ids = self.table[rows, column]
        missing = ids == NULL_PAGE
        if bool(missing.any()):
            wanted = torch.unique(rows[missing] * self.table.shape[1] + column[missing])
            self.table.view(-1)[wanted] = self.pool.allocate(wanted.numel())
            self.pages += wanted.numel()
            ids = self.table[rows, column]
        return self.pool.flat(ids, slots % self.page)

    def write(self, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        flat = self._map(self._rows(slots), slots).reshape(-1)
        self.pool.keys.view(-1, keys.shape[-1]).index_copy_(0, flat, keys.reshape(-1, keys.shape[-1]))
        self.pool.values.view(-1, values.shape[-1]).index_copy_(0, flat, values.reshape(-1, values.shape[-1]))

    def move(self, rows: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
        source, target = self._map(rows, src), self._map(rows, dst)
        for pool in (self.pool.keys, self.pool.values):
            flat = pool.view(-1, pool.shape[-1])
            flat.index_copy_(0, target, flat.index_select(0, source))

    def evicted(self, freed: torch.Tensor) -> None:
        """Nothing to do: a slot's bytes are its own."""

    def fit(self, used: torch.Tensor, reserve: int) -> None:
        need = (used.reshape(-1, 1) + self.page - 1) // self.page  # pages each row still needs
        column = torch.arange(self.table.shape[1], device=self.table.device)
        spare = (column >= need) & (self.table != NULL_PAGE)
        if bool(spare.any()):
            self.pool.release(self.table[spare])
            self.pages -= int(spare.sum())
            self.table[spare] = NULL_PAGE
        width = int(need.max()) if need.numel() else 0
        self.table = self.table[:, :width].contiguous()

    def dense(self, n: int, scratch: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots ``0..n-1`` gathered through the table; ``scratch``: into the pool's reused buffers (valid until the
        next scratch gather, i.e. for one layer's attention)."""
        b, h = self.shape
        width = -(-n // self.page)
        ids = self.table[:, :width]
        if ids.shape[1] < width:  # rows not written that far yet read the null page
            ids = torch.cat([ids, ids.new_full((ids.shape[0], width - ids.shape[1]), NULL_PAGE)], dim=1)
        ids = ids.reshape(-1)
        out = []
        for name, pool in (("keys", self.pool.keys), ("values", self.pool.values)):
            shape = (ids.numel(), self.page, pool.shape[-1])
            target = None
            if scratch:
                buffer = self.pool.scratch.get(name)
                if buffer is None or buffer.numel() < ids.numel() * self.page * pool.shape[-1]:
                    buffer = self.pool.scratch[name] = pool.new_empty(grown(ids.numel()) * self.page * pool.shape[-1])
                target = buffer[: ids.numel() * self.page * pool.shape[-1]].view(shape)
            gathered = torch.index_select(pool, 0, ids, out=target) if target is not None else pool.index_select(0, ids)
            out.append(gathered.view(b, h, width * self.page, pool.shape[-1])[:, :, :n])
        return out[0], out[1]

    def page_view(self, n: int) -> Pages:
        width = -(-n // self.page)
        table = self.table[:, :width]
        if table.shape[1] < width:
            table = torch.cat([table, table.new_full((table.shape[0], width - table.shape[1]), NULL_PAGE)], dim=1)
        return Pages(self.pool.keys, self.pool.values, table.contiguous())

    def map_batch(self, fn) -> None:
        keys, values = self.dense(self.capacity)
        self.fit(torch.zeros(self.table.shape[0], dtype=torch.long, device=self.table.device), 0)
        self.adopt(fn(keys), fn(values))

    def nbytes(self, float_bytes: int | None = None) -> int:
        table = 0 if self.table is None else self.table.numel() * self.table.element_size()
        return self.pages * self.pool.page_bytes_at(float_bytes) + table
