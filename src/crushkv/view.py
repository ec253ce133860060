"""``LayerView``: the contract between a compressed layer and the policies that score and select its slots.

Implemented by ``CompressedLayer`` (one layer), ``LayerStack`` (same-shape layers folded into the batch for one
selection), ``RowView`` (one batch row of a layer, for per-row budgets) and the tests' ``FakeLayer``. Policies are
typed against it and never unwrap one another's views.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Protocol

import torch


class LayerView(Protocol):
    """Slot-aligned tensors have shape ``[B, kv_heads, n]`` (state: ``[B, kv_heads, ..., n]``)."""

    #: logical position of every slot (meaningless where ``valid`` is False)
    positions: torch.Tensor
    #: slot holds a real token (False: free, evicted or padding)
    valid: torch.Tensor
    #: ``[B]`` position of each row's first non-padding token (sinks start there)
    start: torch.Tensor
    #: tokens ever appended (the next token's position)
    seen: int
    #: real (non-padding) prompt tokens of each batch row: what ratio budgets resolve against
    context_lengths: tuple[int, ...]
    #: every KV head holds the same token in the same slot (layer-shared policies keep it so)
    aligned: bool

    @property
    def state(self) -> Mapping[str, torch.Tensor]:
        """Slot-aligned policy state (running scores), read-only for selection."""

    @property
    def num_kv_heads(self) -> int: ...

    @property
    def order(self) -> torch.Tensor | None:
        """Per-slot token order keys for tie-breaking (``selection.order_keys``); ``None`` when slot order is
        token order."""

    def cached_keys(self) -> torch.Tensor:
        """``[B, kv_heads, n, d]`` cached keys (key-based scores such as KNorm)."""

    def cached_values(self) -> torch.Tensor:
        """``[B, kv_heads, n, dv]`` cached values (value-based scores such as LagKV)."""

    def per_layer(self, key: Hashable, make: Callable[[int], torch.Tensor]) -> torch.Tensor:
        """A value fixed per layer (e.g. a random anchor), made once by ``make(layer_idx)`` and repeated over the
        view's batch rows: ``[B, ...]``."""
