"""``h2o``: Heavy-Hitter Oracle (Zhang et al., arXiv 2306.14048): accumulated attention per KV head."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from crushkv.policies.base import Host, register
from crushkv.stats import ALL_ROWS, Stats, StatsRequest

NORMS = ("raw", "lifetime")


@register
@dataclass
class H2O(Host):
    """Sum of the attention every query paid to a token, accumulated over prefill and decoding.

    ``norm=raw`` is the original H2O score; ``norm=lifetime`` divides by the number of queries that could see the
    token (OpenVINO's NORM_SUM / kvpress' ObservedAttention), removing the bias towards early tokens.
    """

    name = "h2o"
    default_phase = "decode"
    norm: str = "raw"
    stride: int = field(default=1, metadata={"omit_default": True})

    def validate(self) -> None:
        super().validate()
        if self.norm not in NORMS:
            raise ValueError(f"h2o: norm must be one of {NORMS}, got {self.norm!r}")
        if isinstance(self.stride, bool) or not isinstance(self.stride, int) or self.stride < 1:
            raise ValueError(f"h2o: stride must be an int >= 1 (1 = exact statistics), got {self.stride!r}")

    def request(self, first: bool, q_len: int) -> StatsRequest:
        return StatsRequest(rows=ALL_ROWS, count=self.norm == "lifetime", stride=self.stride if first else 1)

    def observe(self, layer, stats: Stats, first: bool) -> None:
        layer.accumulate("score", stats.colsum)
        if self.norm == "lifetime":
            layer.accumulate("count", stats.count)

    def head_scores(self, view) -> torch.Tensor:
        score = view.state["score"]
        if self.norm == "lifetime":
            score = score / view.state["count"].clamp(min=1)[:, :, None, :]
        return score
