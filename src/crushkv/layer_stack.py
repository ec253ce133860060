"""Eviction for many layers at once: same-shape layers folded into the batch dimension.

A policy's selection is a few dozen small tensor ops per layer, so per-op overhead dominates short contexts. A
layer's cache is not read again before the next forward pass, so its eviction can wait: all queued layers with the
same shape (slots, heads, budgets) are then selected together by one ``policy.keep_mask`` on a ``LayerStack``. The
kept sets are the ones per-layer selection gives (tested over the whole policy matrix).

* Decode passes (at most ``DEFER_MAX_TOKENS`` new tokens) queue every layer until the last compressed layer.
* Longer passes (the prompt) queue a layer only while the queued layers' uncompressed keys/values stay within
  ``DEFER_MAX_BYTES``; the queue is cut back before it would grow past that. So the prompt pass holds at most
  ``DEFER_MAX_BYTES`` of uncompressed K/V on top of the layer being computed (short prompts: several layers per
  selection; long prompts, whose selections are cheap next to their attention: one layer at a time).

Rows of one layer whose budgets differ (ratio budgets over a padded batch: each row resolves against its own
prompt) are selected one ``RowView`` at a time, exactly as each row alone would be.

A policy whose selection depends on the layer itself (its index, a per-layer generator) sets ``batchable = False``.
A ``LayerStack`` exposes only what a batchable policy may read; anything else raises ``AttributeError``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING

import torch

from crushkv.profiling import PROFILER
from crushkv.selection import order_keys

if TYPE_CHECKING:
    from crushkv.layer import CompressedLayer

#: decode passes of at most this many new tokens defer their eviction to the end of the pass
DEFER_MAX_TOKENS = 16
#: longer passes (a prompt) queue layers while their uncompressed K/V total at most this many bytes (16 MiB: ten
#: SmolLM2-135M fp32 layers of a 1k prompt, two of a 4k one, none beyond ~5k)
DEFER_MAX_BYTES = 16 << 20


class LayerStack:
    """Read-only ``LayerView`` of ``n`` same-shape ``CompressedLayer``s as one layer with batch ``n * B``."""

    def __init__(self, layers: Sequence[CompressedLayer]) -> None:
        self.layers = list(layers)
        first = self.layers[0]
        self.policy = first.policy
        self.seen = first.seen
        self.context_lengths = tuple(n for layer in self.layers for n in layer.context_lengths)
        self.aligned = all(layer.aligned for layer in self.layers)
        self.positions = torch.cat([layer.positions for layer in self.layers])
        self.valid = torch.cat([layer.valid for layer in self.layers])
        self.start = torch.cat([layer.start for layer in self.layers])
        states = [layer.state for layer in self.layers]
        self.state = {name: torch.cat([s[name] for s in states]) for name in states[0]}
        self._ordered = all(layer.ordered for layer in self.layers)

    @property
    def num_kv_heads(self) -> int:
        return self.valid.shape[1]

    @property
    def order(self) -> torch.Tensor | None:
        return None if self._ordered else order_keys(self.positions)

    def cached_keys(self) -> torch.Tensor:
        return torch.cat([layer.cached_keys() for layer in self.layers])

    def cached_values(self) -> torch.Tensor:
        return torch.cat([layer.cached_values() for layer in self.layers])

    def per_layer(self, key: Hashable, make: Callable[[int], torch.Tensor]) -> torch.Tensor:
        return torch.cat([layer.per_layer(key, make) for layer in self.layers])

    def split(self, keep: torch.Tensor) -> list[torch.Tensor]:
        """Per-layer slices of a stacked keep mask ``[n * B, H, slots]``."""
        return list(keep.chunk(len(self.layers), dim=0))


class RowView:
    """``LayerView`` of one batch row of a layer (a row whose budget differs from the other rows')."""

    def __init__(self, layer: CompressedLayer, row: int) -> None:
        self.layer, self.row = layer, row
        rows = slice(row, row + 1)
        self.policy = layer.policy
        self.seen = layer.seen
        self.context_lengths = layer.context_lengths[rows]
        self.aligned = layer.aligned
        self.positions, self.valid, self.start = layer.positions[rows], layer.valid[rows], layer.start[rows]
        self.state = {name: t[rows] for name, t in layer.state.items()}
        order = layer.order
        self.order = None if order is None else order[rows]
        self.rank, self.num_compressed_layers = layer.rank, layer.num_compressed_layers

    @property
    def num_kv_heads(self) -> int:
        return self.valid.shape[1]

    def cached_keys(self) -> torch.Tensor:
        return self.layer.cached_keys()[self.row : self.row + 1]

    def cached_values(self) -> torch.Tensor:
        return self.layer.cached_values()[self.row : self.row + 1]

    def per_layer(self, key: Hashable, make: Callable[[int], torch.Tensor]) -> torch.Tensor:
        return self.layer.per_layer(key, make)[:1]

    def generator(self, seed: int) -> torch.Generator:
        return self.layer.generator(seed)


def batchable(policy) -> bool:
    """True when ``policy.keep_mask`` may run on a ``LayerStack``."""
    return bool(getattr(policy, "batchable", False))


def _group_key(layer: CompressedLayer, budgets: tuple[int, ...]) -> tuple:
    names = tuple(sorted((name, tuple(t.shape[:-1])) for name, t in layer._state.items()))
    shape = (*layer.valid.shape, layer.key_dim, layer.value_dim)
    return (id(layer.policy), budgets, layer.context_lengths, shape, layer.device, layer.dtype, names)


def select(layer, budgets: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Keep and demote masks of one layer (``Policy.keep_and_demote``): one selection, or one per row when the rows'
    budgets differ."""
    policy = layer.policy
    if len(set(budgets)) == 1:
        return policy.keep_and_demote(layer, budgets[0])
    rows = [policy.keep_and_demote(RowView(layer, b), budget) for b, budget in enumerate(budgets)]
    keep = torch.cat([k for k, _ in rows])
    if all(d is None for _, d in rows):
        return keep, None
    return keep, torch.cat([torch.zeros_like(k) if d is None else d for k, d in rows])


def evict(pending: Sequence[tuple[CompressedLayer, tuple[int, ...]]], batched: bool = True) -> None:
    """Cut every ``(layer, row budgets)`` back to its budgets, one selection per group of same-shape layers."""
    groups: dict[tuple, list] = {}
    for layer, budgets in pending:
        groups.setdefault(_group_key(layer, budgets), []).append(layer)
    for key, layers in groups.items():
        budgets, policy = key[1], layers[0].policy
        if batched and len(layers) > 1 and batchable(policy) and len(set(budgets)) == 1:
            with PROFILER.section("select"):
                stack = LayerStack(layers)
                keep, demote = policy.keep_and_demote(stack, budgets[0])
                cuts = list(zip(stack.split(keep), [None] * len(layers) if demote is None else stack.split(demote)))
        else:
            cuts = []
            for layer in layers:
                with PROFILER.section("select"):
                    cuts.append(select(layer, budgets))
        with PROFILER.section("gather"):
            for layer, (keep, demote) in zip(layers, cuts, strict=True):
                layer.keep(keep, budgets, demote)
