"""``pyramidkv``: PyramidKV (Cai et al., arXiv 2406.02069): SnapKV with budgets decreasing over layers."""

from __future__ import annotations

from dataclasses import dataclass

from crushkv.policies.base import register, resolve_budget
from crushkv.policies.snapkv import SnapKV


def pyramid_budgets(average: int, window: int, length: int, layers: int, beta: int) -> list[int]:
    """Per-layer kept tokens in an arithmetic progression whose mean is exactly ``average``.

    ``window`` is the always-kept part (sink + recent), included in every layer's count.

    Follows KVCache-Factory: ``min = (C-w)//beta``, ``max = 2(C-w) - min`` (capped at ``length - w``), linear in the
    layer index; rounding is spread so the total equals ``layers * average``.
    """
    free = average - window
    if layers == 1 or free <= 0:
        return [average] * layers
    low = free // beta
    high = 2 * free - low
    if high > length - window:
        high = length - window
        low = 2 * free - high
    step = (high - low) / (layers - 1)
    raw = [high - i * step for i in range(layers)]
    budgets = [int(r) for r in raw]
    deficit = layers * free - sum(budgets)
    # hand the rounding remainder to the layers with the largest fractional parts
    for i in sorted(range(layers), key=lambda i: raw[i] - budgets[i], reverse=True)[:deficit]:
        budgets[i] += 1
    return [b + window for b in budgets]


@register
@dataclass
class PyramidKV(SnapKV):
    """Lower layers keep more, upper layers fewer; the budget is the average over the compressed layers."""

    name = "pyramidkv"
    batchable = False  # budgets depend on the layer's rank
    beta: int = 20

    def validate(self) -> None:
        super().validate()
        if self.beta < 1:
            raise ValueError("pyramidkv: beta must be >= 1")

    def budget_for(self, view) -> tuple[int, ...]:
        return tuple(self._row_budget(view, length) for length in view.context_lengths)

    def _row_budget(self, view, length: int) -> int:
        average = resolve_budget(self.budget, length, self.min_budget())
        if length <= average:
            return average
        budgets = pyramid_budgets(average, self.min_budget(), length, view.num_compressed_layers, self.beta)
        return budgets[view.rank]
