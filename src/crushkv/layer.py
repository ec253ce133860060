"""``CompressedLayer``: one compressed attention layer, its slot metadata over a ``KVStore``.

Every (batch row, KV head) is a row of slots. Per slot the layer keeps the token's logical position, whether it
holds a real token (``valid``; False for free, evicted and padding slots) and the policy's slot-aligned state. The
store (``crushkv.stores``) only holds the bytes, so the same slots end up in the same places whatever the store:

* a new token goes into the lowest free slot of each row, written in place (no copy of the layer per step);
* an eviction only clears ``valid``; a row whose holes exceed what the next ``reserve`` writes refill by a page is
  compacted (its last slots move into its holes, O(evicted)) and the store releases what lies above;
* slots are therefore not in sequence order: sink/recent and tie-breaking read positions (``crushkv.selection``).

The layer reports the *logical* length from ``get_seq_length`` (so transformers derives correct RoPE positions for
new tokens) and an empty past from ``get_mask_sizes`` (crushkv's attention builds its own masks from the slots and
only reads the new tokens' padding off transformers' mask).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch
from transformers.cache_utils import DynamicLayer

from crushkv.attention_math import Visibility
from crushkv.quant import BITS
from crushkv.selection import mask_to_indices, order_keys
from crushkv.stats import Stats
from crushkv.stores import KVStore, LowTier, grown


class CompressedLayer(DynamicLayer):
    """One compressed layer: slot metadata (positions, validity, policy state) over a ``KVStore``."""

    is_croppable = False

    def __init__(
        self,
        policy,
        layer_idx: int,
        rank: int,
        num_compressed_layers: int,
        make_store: Callable[[torch.Tensor, torch.Tensor], KVStore],
        window: int | None = None,
    ) -> None:
        super().__init__()
        self.policy = policy
        self.layer_idx = layer_idx
        #: index among compressed layers and their count (PyramidKV's layer-wise budgets)
        self.rank = rank
        self.num_compressed_layers = num_compressed_layers
        self.make_store = make_store
        #: sliding window of the layer (a query sees the last ``window`` positions), None for full attention
        self.window = window
        self._clear()

    def _clear(self) -> None:
        self.store: KVStore | None = None
        #: evicted tokens kept at low precision (``tier=``), None when evicted tokens are dropped
        self.tier: LowTier | None = None
        self._positions: torch.Tensor | None = None  # [B, H, capacity]
        self._valid: torch.Tensor | None = None  # [B, H, capacity]
        self._state: dict[str, torch.Tensor] = {}  # [B, H, ..., capacity]
        self.extras: dict[Hashable, torch.Tensor] = {}  # per-layer policy values (anchors)
        self.generators: dict[int, torch.Generator] = {}
        self.seen = 0
        self.hw = 0  # slots [0, hw) of some row may hold a token: the length attention and selection work on
        self.max_count = 0  # upper bound of the tokens held by any row
        self.min_count = 0  # lower bound of the tokens held by any row (exact bounds spare a host sync per cut)
        self.prompt_done = False
        self.context_lengths: tuple[int, ...] = ()
        self.start: torch.Tensor | None = None
        self.ordered = True  # slot order is token order (nothing written into a hole, nothing moved yet)
        self.aligned = True  # every KV head holds the same token in each slot
        self.holes = False  # some row may have a free slot below hw
        self._pass_slots: torch.Tensor | None = None
        self.pass_key: torch.Tensor | None = None
        self.pass_values: torch.Tensor | None = None
        self.key_dim = self.value_dim = 0
        self.notes: list[str] = []
        self.transient = False  # set while ``crushkv.reconstruct`` runs its passes

    # ------------------------------------------------------------------ transformers' layer API
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.key_dim, self.value_dim = key_states.shape[-1], value_states.shape[-1]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.transient:  # a reconstruction pass: its tokens are attended over, never stored
            self.pass_key, self.pass_values = key_states, value_states
            return key_states, value_states
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, h, q = key_states.shape[:3]
        if self.store is None:
            self.store = self.make_store(key_states, value_states)
            self.store.adopt(key_states, value_states)
            low = self.policy.low_precision()
            if low != "drop":
                self.tier = LowTier(BITS[low], self.policy.group)
            self._positions = torch.arange(q, device=self.device).expand(b, h, q).contiguous()
            self._valid = torch.ones(b, h, q, dtype=torch.bool, device=self.device)
            self._fit_metadata()
            self.hw = self.max_count = self.min_count = q
            slots = None
        else:
            slots = self._allocate(q)
            self.store.write(slots, key_states, value_states)
            new = torch.arange(self.seen, self.seen + q, device=self.device).expand(b, h, q)
            self._positions.scatter_(-1, slots, new)
            self._valid.scatter_(-1, slots, True)
            for name, tensor in self._state.items():  # a slot's state starts again from zero
                index = slots.view(b, h, *([1] * (tensor.dim() - 3)), q).expand(*tensor.shape[:-1], q)
                self._state[name] = tensor.scatter_(-1, index, 0)
        self._pass_slots = slots
        self.seen += q
        self.pass_key, self.pass_values = key_states, value_states
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int | torch.Tensor) -> tuple[int, int]:
        # transformers < 5.3 passes ``cache_position`` (the new tokens' positions), later versions the count.
        if isinstance(query_length, torch.Tensor):
            query_length = query_length.shape[0]
        return query_length, self.seen

    def reset(self) -> None:
        self._clear()
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a compressed cache cannot be cropped (evicted tokens cannot be restored)")

    def offload(self) -> None:
        raise NotImplementedError("a compressed cache cannot be offloaded")

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def _map_batch(self, fn) -> None:
        if self.store is None:
            return
        self.store.map_batch(fn)
        if self.tier is not None:
            self.tier.map_batch(fn)
        self._positions, self._valid = fn(self._positions), fn(self._valid)
        self._state = {name: fn(t) for name, t in self._state.items()}
        self.start = fn(self.start)
        self.context_lengths = tuple(fn(torch.tensor(self.context_lengths)).tolist())
        self._fit_metadata()

    # ------------------------------------------------------------------ slots
    @property
    def capacity(self) -> int:
        return 0 if self._valid is None else self._valid.shape[-1]

    def _fit_metadata(self) -> None:
        """Pad or cut the slot metadata to the store's capacity."""
        target, current = max(self.store.capacity, self.hw), self.capacity

        def fit(t: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, target - current)) if target > current else t[..., :target]

        if target != current:
            self._positions, self._valid = fit(self._positions), fit(self._valid)
            self._state = {name: fit(t).contiguous() for name, t in self._state.items()}

    def _allocate(self, q: int) -> torch.Tensor:
        """``[B, H, q]`` slots for this pass's tokens: the lowest free slots of each row (growing if needed)."""
        b, h = self._valid.shape[:2]
        need = self.max_count + q
        if need > self.store.capacity:
            self.store.reserve(need)
        self._fit_metadata()
        if not self.holes:  # every row holds exactly slots [0, hw): append
            slots = torch.arange(self.hw, self.hw + q, device=self.device).expand(b, h, q)
        elif q == 1:  # steady decoding: the first free slot of each row (one exists: capacity >= max_count + 1)
            slots = (~self._valid).to(torch.uint8).argmax(-1, keepdim=True)
            self.ordered = False
        else:
            free = ~self._valid
            slots = mask_to_indices(free & (free.cumsum(-1) <= q), q)
            self.ordered = False
        self.hw = max(self.hw, self.max_count + q)  # a row fills its holes before it extends its high-water mark
        self.max_count = need
        self.min_count += q
        return slots

    def keep(self, mask: torch.Tensor, budgets: tuple[int, ...], demote: torch.Tensor | None = None) -> None:
        """Free every slot outside ``mask`` (``[B, H, n]``), compact rows with many holes, release storage.
        With a low-precision tier the freed tokens move into it first: ``demote`` of them, else all."""
        n = mask.shape[-1]
        if self.tier is not None:  # before their slots are reused
            keys, values = self.store.dense(n)
            moved = self._valid[..., :n] & ~mask
            self.tier.add(moved if demote is None else moved & demote, self._positions[..., :n], keys, values)
        self._valid[..., :n] &= mask
        self.store.evicted(~mask)
        self.holes = True
        self.aligned = self.aligned and bool(self.policy.shared)
        reserve = self.reserve_after_cut(budgets)
        budget = budgets[0]
        # (demoted tokens leave the store: each row then holds fewer than its budget, so the counts are taken)
        steady = len(set(budgets)) == 1 and not self.policy.ragged and self.min_count >= budget and demote is None
        if steady and self.hw - budget < reserve + self.policy.page:
            # every row had at least ``budget`` tokens, so each now holds exactly ``budget``, and none has holes
            # enough to compact: nothing to count (no host sync), nothing to release
            self.max_count = self.min_count = budget
            return
        self.tidy(reserve)

    def tidy(self, reserve: int) -> None:
        """Compact rows whose holes exceed ``reserve`` by a page, then let the store release what is above."""
        n = self.hw
        valid = self._valid[..., :n]
        counts = valid.sum(-1)  # [B, H]
        slot = torch.arange(n, device=self.device)
        high = (valid * (slot + 1)).amax(-1) if n else counts
        sparse = high - counts >= reserve + self.policy.page
        if counts.numel():
            self.max_count, self.min_count = int(counts.max()), int(counts.min())
        if bool(sparse.any()):
            self._compact(valid, counts, sparse, slot)
            high = torch.where(sparse, counts, high)
        self.hw = int(high.max()) if high.numel() else 0
        self.store.fit(high, reserve)
        self._fit_metadata()

    def _compact(self, valid: torch.Tensor, counts: torch.Tensor, sparse: torch.Tensor, slot: torch.Tensor) -> None:
        """Move each sparse row's tokens above its count into its holes below it (count order is kept per row)."""
        b, h, n = valid.shape
        target = counts[..., None]
        rows_sel = sparse[..., None]
        src = (valid & (slot >= target) & rows_sel).reshape(b * h, n).nonzero()
        dst = (~valid & (slot < target) & rows_sel).reshape(b * h, n).nonzero()
        rows, src_slot, dst_slot = src[:, 0], src[:, 1], dst[:, 1]
        self.store.move(rows, src_slot, dst_slot)
        bi, hi = rows // h, rows % h
        self._positions[bi, hi, dst_slot] = self._positions[bi, hi, src_slot]
        for tensor in self._state.values():
            tensor[bi, hi, ..., dst_slot] = tensor[bi, hi, ..., src_slot]
        self._valid[bi, hi, dst_slot] = True
        self._valid[bi, hi, src_slot] = False
        self.ordered = False

    # ------------------------------------------------------------------ one forward pass (driven by the cache)
    def begin_pass(self, attention_mask: torch.Tensor | None, q: int) -> tuple[torch.Tensor, bool]:
        """Mark this pass's padding tokens (read off transformers' mask); returns ``(row_valid [B, q], first)``."""
        b, h = self._valid.shape[:2]
        row_valid = new_token_validity(attention_mask, b, q).to(self.device)
        first = not self.prompt_done
        if first:
            self._valid[:, :, :q] = row_valid[:, None, :]
            self.store.evicted(~row_valid[:, None, :].expand(b, h, q))
            lengths = row_valid.sum(-1)
            self.context_lengths = tuple(int(n) for n in lengths.tolist())
            self.start = row_valid.long().argmax(-1)
            self.min_count = min(self.context_lengths, default=q)
            if self.min_count < q:
                self.holes = True
        elif attention_mask is not None:
            self._valid.scatter_(-1, self._pass_slots, row_valid[:, None, :].expand(b, h, q))
            if not bool(row_valid.all()):
                self.holes = True
                self.min_count = max(0, self.min_count - q)
        return row_valid, first

    def visibility(self, q: int, first: bool) -> Visibility:
        """Which slots each of this pass's queries sees (built lazily by the attention math)."""
        n = q if first else self.hw
        heads = 1 if self.aligned else self._valid.shape[1]
        query_positions = torch.arange(self.seen - q, self.seen, device=self.device)
        plain = not self.holes and (first or q == 1) and (self.window is None or self.seen <= self.window)
        return Visibility(
            self._positions[:, :heads, :n], self._valid[:, :heads, :n], query_positions, self.window, plain, first
        )

    def attention_inputs(self, first: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """This pass's keys/values: the store's first ``hw`` slots (for the prompt: the pass's own tensors, unless
        the store holds them as they are)."""
        if first and not self.store.dense_is_a_view:
            return self.pass_key, self.pass_values
        if first:
            return self.store.dense(self.pass_key.shape[2])
        return self.store.dense(self.hw, scratch=True)

    def finish_pass(self, stats: Stats, first: bool, active: bool) -> tuple[int, ...] | None:
        """Fold the statistics into the policy state; the row budgets when the layer must be cut, else None."""
        self.prompt_done = True
        self.pass_key = self.pass_values = None
        if self.window is not None:
            inside = self._positions[..., : self.hw] > self.seen - self.window
            self._valid[..., : self.hw] &= inside
            self.store.evicted(~inside)
            self.holes = True
            self.max_count, self.min_count = min(self.max_count, self.window), 0
        if not active:
            return None
        self.policy.observe(self, stats, first)
        budgets = self.policy.budget_for(self)
        if first:
            self._note_raised_budget(budgets)
        slack = 0 if first else self.policy.interval_for(max(budgets)) - 1
        return budgets if self.max_count > max(budgets) + slack else None

    def reserve_after_cut(self, budgets: tuple[int, ...]) -> int:
        """Tokens the layer will append before its next cut: the interval (decode phase) or a growth step."""
        budget = max(budgets)
        if self.policy.phase == "decode":
            return self.policy.interval_for(budget)
        return grown(budget) - budget

    def _note_raised_budget(self, budgets: tuple[int, ...]) -> None:
        budget = self.policy.budget
        if not isinstance(budget, float):
            return
        for length, kept in zip(self.context_lengths, budgets):
            if round(budget * length) < kept:
                outcome = "nothing is evicted" if length <= kept else "the always-kept tokens"
                self.notes.append(
                    f"budget={budget} of a {length}-token prompt is {round(budget * length)} tokens: raised to "
                    f"sink+recent={kept} ({outcome})"
                )
                return

    # ------------------------------------------------------------------ LayerView (what policies read)
    @property
    def positions(self) -> torch.Tensor:
        return self._positions[..., : self.hw]

    @property
    def valid(self) -> torch.Tensor:
        return self._valid[..., : self.hw]

    @property
    def state(self) -> dict[str, torch.Tensor]:
        return {name: t[..., : self.hw] for name, t in self._state.items()}

    @property
    def num_kv_heads(self) -> int:
        return self._valid.shape[1]

    @property
    def order(self) -> torch.Tensor | None:
        return None if self.ordered else order_keys(self.positions)

    def cached_keys(self) -> torch.Tensor:
        return self.store.dense(self.hw)[0]

    def cached_values(self) -> torch.Tensor:
        return self.store.dense(self.hw)[1]

    def per_layer(self, key: Hashable, make: Callable[[int], torch.Tensor]) -> torch.Tensor:
        if key not in self.extras:
            self.extras[key] = make(self.layer_idx).to(self.device)
        value = self.extras[key]
        return value.expand(self._valid.shape[0], *value.shape)

    def generator(self, seed: int) -> torch.Generator:
        """A CPU generator per (seed, layer), created once so draws are reproducible run to run."""
        if seed not in self.generators:
            self.generators[seed] = torch.Generator().manual_seed(seed * 1_000_003 + self.layer_idx)
        return self.generators[seed]

    def accumulate(self, name: str, value: torch.Tensor) -> None:
        """Add slot-aligned ``value`` (``[..., n]``) into the state ``name`` (created on first use)."""
        if name not in self._state:
            self.set_state(name, value)
        else:
            self._state[name][..., : value.shape[-1]] += value

    def set_new(self, name: str, value: torch.Tensor) -> None:
        """Write ``value`` (``[B, H, ..., q]``) into the state ``name`` at this pass's slots (the prompt: all)."""
        if self._pass_slots is None:
            self.set_state(name, value)
            return
        if name not in self._state:
            self._state[name] = value.new_zeros(*value.shape[:-1], self.capacity)
        tensor, slots = self._state[name], self._pass_slots
        index = slots.view(*slots.shape[:2], *([1] * (tensor.dim() - 3)), slots.shape[-1])
        tensor.scatter_(-1, index.expand(*tensor.shape[:-1], slots.shape[-1]), value)

    def set_state(self, name: str, value: torch.Tensor) -> None:
        """Replace the state ``name`` by slot-aligned ``value`` (``[..., n]``; slots above ``n`` are zero)."""
        tensor = value.new_zeros(*value.shape[:-1], self.capacity)
        tensor[..., : value.shape[-1]] = value
        self._state[name] = tensor

    # ------------------------------------------------------------------ inspection
    def counts(self) -> torch.Tensor:
        """``[B, H]`` tokens held per (batch row, KV head)."""
        return self.valid.sum(-1)

    def kept_positions(self) -> torch.Tensor:
        """``[B, H, max kept]`` held positions, ascending, ``-1`` where a row holds fewer."""
        if self._valid is None:
            return torch.zeros(0, 0, 0, dtype=torch.long)
        big = torch.iinfo(torch.long).max
        ordered = torch.where(self.valid, self.positions, big).sort(-1).values
        width = int(self.counts().max()) if self.hw else 0
        ordered = ordered[..., :width]
        return torch.where(ordered == big, -1, ordered)


def new_token_validity(attention_mask: torch.Tensor | None, batch: int, q_len: int) -> torch.Tensor:
    """``[B, q]`` padding flags of this pass's tokens: whether each new token may see itself in the 4-D mask (its
    diagonal entry; a sliding window hides earlier columns of the last row, never the diagonal)."""
    if attention_mask is None:
        return torch.ones(batch, q_len, dtype=torch.bool)
    itself = attention_mask[:, 0, -q_len:, -q_len:].diagonal(dim1=-2, dim2=-1)
    itself = itself if itself.dtype == torch.bool else itself == 0
    return itself.expand(batch, q_len)
