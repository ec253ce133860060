"""Eviction for many layers at once: same-shape layers folded into the batch dimension.

A policy's selection is a few dozen small tensor ops per layer, so per-op overhead dominates short contexts. A
layer's cache is not read again before the next forward pass, so its eviction can wait: all queued layers with the
same shape (slots, heads, budget) are then selected together by one ``policy.select`` on a ``LayerStack``. The kept
sets are the ones per-layer selection gives (tested over the whole policy matrix).

* Decode passes (at most ``DEFER_MAX_TOKENS`` new tokens) queue every layer until the last compressed layer.
* Longer passes (the prompt) queue a layer only while the queued layers' uncompressed keys/values stay within
  ``DEFER_MAX_BYTES``; the queue is cut back before it would grow past that. So the prompt pass holds at most
  ``DEFER_MAX_BYTES`` of uncompressed K/V on top of the layer being computed (short prompts: several layers per
  selection; long prompts, whose selections are cheap next to their attention: one layer at a time, as before).

A policy whose selection depends on the layer itself (its index, a per-layer generator) sets ``batchable = False``.
A ``LayerStack`` exposes only what a batchable policy may read; anything else raises ``AttributeError``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from crushkv.profiling import PROFILER

if TYPE_CHECKING:
    from crushkv.cache import CompressedLayer

#: decode passes of at most this many new tokens defer their eviction to the end of the pass
DEFER_MAX_TOKENS = 16
#: longer passes (a prompt) queue layers while their uncompressed K/V total at most this many bytes (16 MiB: ten
#: SmolLM2-135M fp32 layers of a 1k prompt, two of a 4k one, none beyond ~5k)
DEFER_MAX_BYTES = 16 << 20


class LayerStack:
    """Read-only view of ``n`` same-shape ``CompressedLayer``s as one layer with batch ``n * B`` (layer-major)."""

    def __init__(self, layers: Sequence[CompressedLayer]) -> None:
        self.layers = list(layers)
        first = self.layers[0]
        self.policy = first.policy
        self.context_length = first.context_length
        self.num_heads = first.num_heads
        self.positions = torch.cat([layer.positions for layer in self.layers])
        self.valid = torch.cat([layer.valid for layer in self.layers])
        self.state = {name: torch.cat([layer.state[name] for layer in self.layers]) for name in first.state}
        self._keys: torch.Tensor | None = None

    @property
    def keys(self) -> torch.Tensor:
        """Stacked keys, built on first use (only key-based scores such as KNorm read them)."""
        if self._keys is None:
            self._keys = torch.cat([layer.keys for layer in self.layers])
        return self._keys

    @property
    def physical_length(self) -> int:
        return self.positions.shape[-1]

    def split(self, keep: torch.Tensor) -> list[torch.Tensor]:
        """Per-layer slices of a stacked selection ``[n * B, H, k]``."""
        return list(keep.chunk(len(self.layers), dim=0))


def members(layer) -> list:
    """The layers behind ``layer``: the stacked ones for a ``LayerStack``, else ``[layer]``."""
    return layer.layers if isinstance(layer, LayerStack) else [layer]


def batchable(policy) -> bool:
    """True when ``policy.select`` may run on a ``LayerStack``."""
    return bool(getattr(policy, "batchable", False))


def _group_key(layer: CompressedLayer, budget: int) -> tuple:
    keys = layer.keys
    names = tuple(sorted((name, tuple(t.shape)) for name, t in layer.state.items()))
    return (id(layer.policy), budget, layer.context_length, tuple(keys.shape), keys.device, keys.dtype, names)


def evict(pending: Sequence[tuple[CompressedLayer, int]], batched: bool = True) -> None:
    """Cut every ``(layer, budget)`` back to its budget, one ``select`` per group of same-shape layers."""
    groups: dict[tuple, list] = {}
    for layer, budget in pending:
        groups.setdefault(_group_key(layer, budget), []).append(layer)
    for key, layers in groups.items():
        budget, policy = key[1], layers[0].policy
        if batched and len(layers) > 1 and batchable(policy):
            with PROFILER.section("select"):
                stack = LayerStack(layers)
                keeps = stack.split(policy.select(stack, budget))
        else:
            keeps = []
            for layer in layers:
                with PROFILER.section("select"):
                    keeps.append(policy.select(layer, budget))
        with PROFILER.section("gather"):
            for layer, keep in zip(layers, keeps, strict=True):
                layer.prune(keep)
