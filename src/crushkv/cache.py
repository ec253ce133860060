"""``CrushCache``: a transformers 5.x ``Cache`` whose compressed layers really shrink to the kept tokens.

Full-attention layers are ``CompressedLayer``s (slot metadata over a ``KVStore``, ``crushkv.layer``); sliding-window
layers of mixed models (Gemma3) keep transformers' ``DynamicSlidingWindowLayer`` and are not compressed. A model
whose every layer is sliding-window (Mistral v0.1) has its layers compressed with their window applied.

The cache also drives each compressed layer's forward pass (``run_attention``, called by crushkv's attention
function): mark the new tokens' padding, compute attention and the statistics the policy asks for, fold them into
the policy state and queue the layer's eviction, which runs in batches of same-shape layers (``layer_stack``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from transformers.cache_utils import Cache, DynamicSlidingWindowLayer

from crushkv.attention_math import Visibility, attend, paged_attend
from crushkv.layer import CompressedLayer, new_token_validity
from crushkv.layer_stack import DEFER_MAX_BYTES, DEFER_MAX_TOKENS, evict
from crushkv.policies import Policy, parse_policy
from crushkv.policies.kvzip import SCORE as KVZIP_SCORE
from crushkv.policies.kvzip import chunk_scores
from crushkv.profiling import PROFILER
from crushkv.quant import BITS
from crushkv.stats import StatsRequest
from crushkv.stores import BlockPool, DenseStore, KVStore, PagedStore, QuantScratch, QuantStore
from crushkv.stores.base import storage_nbytes

FULL_TYPES = ("full_attention",)
SLIDING_TYPES = ("sliding_attention",)


def text_config(config):
    """The text part of a (possibly multimodal) config."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _layer_types(config) -> tuple[list[str], list[int | None]]:
    """Attention type and sliding window of every decoder layer."""
    n = config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if types is None:
        uses_window = window is not None and getattr(config, "use_sliding_window", True)
        types = ["sliding_attention" if uses_window else "full_attention"] * n
    return list(types), [window if t in SLIDING_TYPES else None for t in types]


class PassPlan(NamedTuple):
    """What one pass of a compressed layer does (``CrushCache.begin_pass``)."""

    q: int
    first: bool  # the layer's first pass (the prompt)
    active: bool  # the policy observes this pass
    request: StatsRequest | None  # what it asks attention for
    row_valid: torch.Tensor  # [B, q] False for padding queries
    visibility: Visibility


class CrushCache(Cache):
    """Cache for one ``crushkv.compress`` context."""

    def __init__(self, config, policy: Policy | str, defer_bytes: int = DEFER_MAX_BYTES) -> None:
        config = text_config(config)
        self.policy = parse_policy(policy)
        types, windows = _layer_types(config)
        unknown = sorted({t for t in types if t not in FULL_TYPES + SLIDING_TYPES})
        if unknown:
            raise ValueError(
                f"unsupported attention layout {unknown}: crushkv compresses full-attention layers and keeps "
                "sliding-window layers; linear/chunked/MoE-only layers are not supported"
            )
        compressed = [i for i, t in enumerate(types) if t in FULL_TYPES]
        windowed = not compressed  # every layer slides: compress them all, each with its window
        if windowed:
            compressed = list(range(len(types)))
        layers: list = []
        for i, window in enumerate(windows):
            if i in compressed:
                rank = compressed.index(i)
                layers.append(CompressedLayer(self.policy, i, rank, len(compressed), self._new_store, window))
            else:
                layers.append(DynamicSlidingWindowLayer(sliding_window=window))
        super().__init__(layers=layers)
        self.active = False
        #: evictions queued for one batched selection (see ``crushkv.layer_stack``), with their row budgets
        self.pending: list[tuple[CompressedLayer, tuple[int, ...]]] = []
        #: cap on the uncompressed prompt K/V the queue may hold; 0 cuts the prompt layer by layer
        self.defer_bytes = defer_bytes
        #: one page pool per (key dim, value dim, dtype, device), shared by the layers of a ``store=paged`` cache
        self.pools: dict[tuple, BlockPool] = {}
        #: one dequantization buffer for the layers of a ``quant=`` cache (they attend one after the other)
        self.quant_scratch = QuantScratch()
        self.foreign_cache_warned = False
        #: the model's RoPE (``crushkv.rope.find_rope``), set by ``compress`` for query-statistics hosts
        self.rope = None
        #: the tokenizer (``compress(..., tokenizer=)``): KVzip's reconstruction instruction is text
        self.tokenizer = None
        #: the prompt pass ended uncut and waits for its reconstruction passes (``crushkv.reconstruct``)
        self.reconstruct_due = False
        #: the chunk a reconstruction pass scores, while one runs
        self.reconstructing = None

    def _new_store(self, keys: torch.Tensor, values: torch.Tensor) -> KVStore:
        if self.policy.quant != "none":
            policy = self.policy
            return QuantStore(BITS[policy.quant], policy.group, policy.residual, self.quant_scratch)
        if self.policy.store == "paged":
            key = (keys.shape[-1], values.shape[-1], keys.dtype, keys.device)
            if key not in self.pools:
                self.pools[key] = BlockPool(self.policy.page, keys.shape[-1], values.shape[-1], keys.dtype, keys.device)
            return PagedStore(self.pools[key])
        return DenseStore()

    def reset(self) -> None:
        self.pending = []
        self.reconstruct_due, self.reconstructing = False, None
        self.pools = {}
        self.quant_scratch = QuantScratch()
        super().reset()

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if not self.active:
            raise RuntimeError(
                "a CrushCache is only valid inside `with crushkv.compress(model, spec) as cache:` "
                "(the compressed layers need crushkv's attention function)"
            )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    # ------------------------------------------------------------------ one forward pass of a compressed layer
    def run_attention(
        self, layer: CompressedLayer, query: torch.Tensor, attention_mask, scaling: float, position_ids=None
    ) -> torch.Tensor:
        """Attention of this pass's queries over ``layer``'s slots, then statistics, policy state and eviction.

        Evictions are queued and run in batches of same-shape layers: a decode pass at its last compressed layer,
        a prompt whenever the queued uncompressed K/V would exceed ``defer_bytes``.
        """
        if self.reconstructing is not None:
            return self.reconstruction_pass(layer, query, attention_mask, scaling)
        plan = self.begin_pass(layer, query, attention_mask)
        with PROFILER.section("attention"):
            out, stats = self.attend(layer, plan, query, scaling)
        self.end_pass(layer, plan, query, stats, position_ids)
        return out

    def reconstruction_pass(self, layer: CompressedLayer, query: torch.Tensor, attention_mask, scaling: float):
        """A pass of ``crushkv.reconstruct``: its tokens (not stored: ``layer.transient``) attend over the layer's
        slots and each other as usual, and the same queries give the chunk's KVzip scores (added to the layer's
        state). Nothing is observed or cut."""
        b, q = query.shape[0], query.shape[2]
        row_valid = new_token_validity(attention_mask, b, q).to(query.device)
        keys, values = layer.attention_inputs(False)
        h = keys.shape[1]
        new = torch.arange(layer.seen, layer.seen + q, device=query.device)
        positions = torch.cat([layer.positions, new.expand(b, h, q)], -1)
        valid = torch.cat([layer.valid, row_valid[:, None].expand(b, h, q)], -1)
        keys = torch.cat([keys, layer.pass_key], 2)
        values = torch.cat([values, layer.pass_values], 2)
        layer.pass_key = layer.pass_values = None
        visibility = Visibility(positions, valid, new, layer.window)
        out, _ = attend(query, keys, values, visibility, row_valid, scaling, None)
        chunk = self.reconstructing
        scores = chunk_scores(
            query, keys, positions, valid, row_valid, chunk.bounds, chunk.sink_end, layer.seen, scaling
        )
        layer.accumulate(KVZIP_SCORE, scores[..., : layer.hw])
        return out

    def begin_pass(self, layer: CompressedLayer, query: torch.Tensor, attention_mask) -> PassPlan:
        """Padding flags, whether the policy acts on this pass, what it asks attention for, what queries see."""
        q = query.shape[2]
        if self.pending and layer.rank == 0:
            self.evict_pending()  # left over from an interrupted pass
        row_valid, first = layer.begin_pass(attention_mask, q)
        policy = self.policy
        active = policy.compresses and (policy.phase == "decode" or first)
        request = policy.request(first, q) if active else None
        return PassPlan(q, first, active, request, row_valid, layer.visibility(q, first))

    def attend(self, layer: CompressedLayer, plan: PassPlan, query: torch.Tensor, scaling: float):
        """The pass's output and the statistics the plan requests."""
        if layer.tier is not None and len(layer.tier):
            return self._attend_with_tier(layer, plan, query, scaling)
        result = None
        if not plan.first and plan.q <= DEFER_MAX_TOKENS:  # decode: the fused kernel reads the store's pages in place
            pages = layer.store.page_view(layer.hw)
            result = paged_attend(query, pages, layer.hw, plan.visibility, plan.row_valid, scaling, plan.request)
        if result is None:
            keys, values = layer.attention_inputs(plan.first)
            result = attend(query, keys, values, plan.visibility, plan.row_valid, scaling, plan.request)
        return result

    def _attend_with_tier(self, layer: CompressedLayer, plan: PassPlan, query: torch.Tensor, scaling: float):
        """Attention over the layer's slots followed by its low-precision tier (``tier=``); the statistics are cut
        back to the layer's slots, the only ones the policy still scores."""
        keys, values = layer.attention_inputs(plan.first)
        tier_keys, tier_values, tier_positions, tier_valid = layer.tier.dense()
        n, vis = keys.shape[2], plan.visibility
        b, h = tier_valid.shape[:2]
        visibility = Visibility(
            torch.cat([vis.positions.expand(b, h, -1), tier_positions], -1),
            torch.cat([vis.valid.expand(b, h, -1), tier_valid], -1),
            vis.query_positions,
            vis.window,
        )
        out, stats = attend(
            query,
            torch.cat([keys, tier_keys], 2),
            torch.cat([values, tier_values], 2),
            visibility,
            plan.row_valid,
            scaling,
            plan.request,
        )
        for name in ("colsum", "count", "last"):
            value = getattr(stats, name)
            if value is not None:
                setattr(stats, name, value[..., :n])
        return out, stats

    def end_pass(self, layer: CompressedLayer, plan: PassPlan, query: torch.Tensor, stats, position_ids) -> None:
        """Fold the statistics into the policy state and queue (or run) the layer's eviction."""
        if plan.request is not None and plan.request.queries:
            self._hand_over(stats, layer, query, plan.row_valid, plan.q, position_ids)
        active = plan.active
        if plan.first and self.policy.reconstructs:  # scored and cut after the reconstruction passes
            self.reconstruct_due, active = True, False
        with PROFILER.section("observe"):
            budgets = layer.finish_pass(stats, plan.first, active)
        if budgets is not None:
            self.queue_eviction(layer, budgets, short_pass=not plan.first and plan.q <= DEFER_MAX_TOKENS)
        if self.pending and layer.rank == layer.num_compressed_layers - 1:
            self.evict_pending()

    def _hand_over(self, stats, layer: CompressedLayer, query, row_valid, q: int, position_ids) -> None:
        """What query-statistics hosts read: this pass's queries, keys, values, RoPE positions and the RoPE."""
        if self.rope is None:
            raise ValueError(f"{self.policy.name} needs the model's rotary embedding, which this model does not expose")
        stats.query, stats.keys, stats.values = query, layer.pass_key, layer.pass_values
        if position_ids is not None:  # the positions the model rotated this pass's tokens with
            stats.rope_positions = position_ids.to(query.device).expand(query.shape[0], q)
        else:  # generate's rule: counted from each row's first real token
            logical = torch.arange(layer.seen - q, layer.seen, device=query.device)
            stats.rope_positions = logical[None] - layer.start[:, None]
        stats.row_valid, stats.rope = row_valid, self.rope
        stats.layer_type = "full_attention" if layer.window is None else "sliding_attention"

    def evict_pending(self) -> None:
        """Run the queued evictions, same-shape layers in one batched selection."""
        pending, self.pending = self.pending, []
        evict(pending)

    def queue_eviction(self, layer: CompressedLayer, budgets: tuple[int, ...], short_pass: bool) -> None:
        """Queue ``layer``'s cut to ``budgets``; the pass's last compressed layer runs the queue (``evict_pending``).

        A short (decode) pass always queues. A long pass (the prompt) queues while the queued layers' uncompressed
        K/V stay within ``defer_bytes``, running the queue first when this layer would push it past that.
        """
        if short_pass:
            self.pending.append((layer, budgets))
            return
        size = layer.store.nbytes()
        queued = sum(other.store.nbytes() for other, _ in self.pending)
        if self.pending and queued + size > self.defer_bytes:
            self.evict_pending()
        if size > self.defer_bytes:
            evict([(layer, budgets)])
            return
        self.pending.append((layer, budgets))

    # ------------------------------------------------------------------ inspection
    @property
    def compressed_layers(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers) if isinstance(layer, CompressedLayer)]

    def kept_positions(self, layer_idx: int) -> torch.Tensor:
        """Logical positions held by a layer, ``[batch, kv_heads, max kept]``, ascending per row, ``-1`` where a
        (batch row, head) holds fewer (padding rows, per-head budgets). For a sliding-window layer: its window."""
        layer = self.layers[layer_idx]
        if isinstance(layer, CompressedLayer):
            return layer.kept_positions()
        if not layer.is_initialized:
            return torch.zeros(0, 0, 0, dtype=torch.long)
        b, h, n = layer.keys.shape[:3]
        start = layer.cumulative_length - n
        return torch.arange(start, start + n, device=layer.keys.device).expand(b, h, n).clone()

    def tier_positions(self, layer_idx: int) -> torch.Tensor:
        """Positions a layer holds in its low-precision tier (``tier=``), ``[batch, kv_heads, max held]`` ascending
        per row, ``-1`` where a row holds fewer; empty without a tier."""
        layer = self.layers[layer_idx]
        tier = getattr(layer, "tier", None)
        if tier is None or not len(tier):
            return torch.zeros(0, 0, 0, dtype=torch.long)
        return tier.held_positions()

    def kept_counts(self, layer_idx: int) -> torch.Tensor:
        """``[batch, kv_heads]`` tokens held per (batch row, KV head) of a compressed layer."""
        return self.layers[layer_idx].counts()

    def kept_tokens(self) -> list[int]:
        """Tokens held per layer: the largest (batch row, KV head) count; the window for sliding layers."""
        out = []
        for layer in self.layers:
            if isinstance(layer, CompressedLayer):
                out.append(int(layer.counts().max()) if layer.store is not None and layer.hw else 0)
            else:
                out.append(0 if not layer.is_initialized else layer.keys.shape[-2])
        return out

    def nbytes(self, float_bytes: int | None = None) -> int:
        """Bytes of key/value storage held: every store's own (a paged store counts its pages in use and its
        block table) plus the sliding-window layers' tensors. ``float_bytes=2``: the same storage with its
        floating-point tensors at 16 bits (``stores.base.storage_nbytes``)."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, CompressedLayer):
                total += 0 if layer.store is None else layer.store.nbytes(float_bytes)
                total += 0 if layer.tier is None else layer.tier.nbytes(float_bytes)
            elif layer.is_initialized:
                total += sum(storage_nbytes(t, float_bytes) for t in (layer.keys, layer.values))
        return total

    def reserved_nbytes(self) -> int:
        """Bytes allocated for K/V: ``nbytes`` plus the free pages of the paged pools (pages are reused, not
        returned to the allocator, while the cache lives)."""
        free_pages = sum(pool.reserved_nbytes() - pool.in_use * pool.page_nbytes for pool in self.pools.values())
        return self.nbytes() + free_pages

    def logical_nbytes(self) -> int:
        """Bytes of the K/V elements of the tokens held (``tokens x (key + value dims) x element size``)."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, CompressedLayer):
                if layer.store is not None:
                    per_token = (layer.key_dim + layer.value_dim) * layer.dtype.itemsize
                    total += int(layer.counts().sum()) * per_token
                if layer.tier is not None:  # its codes and ranges: a demoted token's bytes are its quantized form
                    total += layer.tier.logical_nbytes()
            elif layer.is_initialized:
                total += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
        return total

    def full_nbytes(self) -> int:
        """Bytes an uncompressed cache (``DynamicCache``) would hold for the same tokens."""
        total = 0
        for layer in self.layers:
            if not layer.is_initialized:
                continue
            if isinstance(layer, CompressedLayer):
                if layer.store is None:
                    continue
                b, h = layer.valid.shape[:2]
                n = layer.seen if layer.window is None else min(layer.seen, layer.window - 1)
                total += b * h * n * (layer.key_dim + layer.value_dim) * layer.dtype.itemsize
            else:
                b, h, _, d = layer.keys.shape
                n = min(layer.cumulative_length, layer.sliding_window - 1)
                total += 2 * b * h * n * d * layer.keys.element_size()
        return total

    def notes(self) -> list[str]:
        """The policy's notes plus what happened at run time (e.g. a ratio raised to the always-kept tokens)."""
        notes = list(self.policy.notes())
        for layer in self.layers:
            for note in getattr(layer, "notes", []):
                if note not in notes:
                    notes.append(note)
        return notes

    def summary(self) -> dict[str, object]:
        """Logical length, kept slots per layer, bytes held vs. an uncompressed cache, and notes."""
        return {
            "policy": self.policy.spec,
            "store": self.policy.store,
            "seen_tokens": self.get_seq_length(),
            "kept_tokens": self.kept_tokens(),
            "nbytes": self.nbytes(),
            "full_nbytes": self.full_nbytes(),
            "notes": self.notes(),
        }
