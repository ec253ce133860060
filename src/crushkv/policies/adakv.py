"""``<host>+adakv``: Ada-KV (Feng et al., arXiv 2407.11550) head-wise budgets on top of a per-head host.

The layer's budget is spent by one top-k over the host's scores of all KV heads together, so heads whose attention
is concentrated give slots to heads whose attention is spread; each head first keeps its ``floor`` share (at least
``max(sink + recent, floor * budget)`` tokens, Ada-KV's safeguard). Per batch row the kept counts sum to
``kv_heads * budget``; a head's count varies. ``store=paged`` holds exactly each head's own count (page-rounded);
``store=dense`` pads every head to the largest one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from crushkv.policies.base import Wrapper
from crushkv.selection import NEG, top_mask
from crushkv.view import LayerView


@dataclass
class AdaKV(Wrapper):
    """Head-wise adaptive budgets: one top-k over all KV heads of a layer, ``floor`` of the budget per head first."""

    name: ClassVar[str] = "adakv"

    floor: float = 0.2

    def validate(self) -> None:
        super().validate()
        if self.host.shared:
            raise ValueError(
                f"adakv: {self.host.name} keeps one token set per layer; head-wise budgets need a per-head host"
            )
        if isinstance(self.floor, bool) or not isinstance(self.floor, (int, float)) or not 0.0 <= self.floor <= 1.0:
            raise ValueError(f"adakv: floor must be a fraction of the budget in [0, 1], got {self.floor!r}")

    @property
    def ragged(self) -> bool:  # type: ignore[override]
        return True

    def head_floor(self, budget: int) -> int:
        """Tokens every KV head keeps before the shared top-k (its sink and recent tokens at least)."""
        return min(budget, max(self.min_budget(), round(self.floor * budget)))

    def keep_mask(self, view: LayerView, budget: int) -> torch.Tensor:
        prio = self.host.priorities(view)  # type: ignore[attr-defined]
        return headwise_mask(prio, view, budget, self.head_floor(budget))


def headwise_mask(prio: torch.Tensor, view: LayerView, budget: int, floor: int) -> torch.Tensor:
    """``[B, H, n]`` keep mask of ``H * budget`` slots per row: each head's ``floor`` best, then one top-k over the
    rest of all heads together (ties: the earlier token, then the lower head)."""
    b, h, n = prio.shape
    valid, order = view.valid, view.order
    own = top_mask(prio, floor, order) & valid
    flat = torch.where(own, NEG, prio).reshape(b, h * n)
    # unique tie-break keys whatever the slot layout
    head = torch.arange(h, device=prio.device)[:, None]
    slot = torch.arange(n, device=prio.device)
    flat_order = ((view.positions * h + head) * n + slot).reshape(b, h * n)
    shared = top_mask(flat, h * (budget - floor), flat_order).view(b, h, n)
    return own | (shared & valid & ~own)
