"""``snapkv``: SnapKV (Li et al., arXiv 2404.14469): observation-window attention, pooled, per KV head."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from crushkv.policies.base import Host, register
from crushkv.stats import ALL_ROWS, Stats, StatsRequest

POOLS = ("avg", "max")


@register
@dataclass
class SnapKV(Host):
    """Scores = attention of the last ``window`` prompt queries, smoothed by a 1-D pool of size ``kernel``.

    The window tokens are always kept (``recent`` defaults to ``window``). With ``phase=decode`` the window scores
    seed a running sum that each generated token's attention adds to (OpenVINO GenAI's SnapKV-initialised H2O).
    """

    name = "snapkv"
    sink: int = 0
    recent: int = -1
    window: int = 32
    kernel: int = 7
    pool: str = "avg"

    def __post_init__(self) -> None:
        if self.recent == -1:
            self.recent = self.window
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        if self.window < 1:
            raise ValueError(f"{self.name}: window must be >= 1")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"{self.name}: kernel must be a positive odd number, got {self.kernel}")
        if self.pool not in POOLS:
            raise ValueError(f"{self.name}: pool must be one of {POOLS}, got {self.pool!r}")

    def request(self, first: bool, q_len: int) -> StatsRequest:
        return StatsRequest(rows=self.window if first else ALL_ROWS)

    def observe(self, layer, stats: Stats, first: bool) -> None:
        if first:
            layer.set_state("score", self.smooth(stats.colsum))  # the prompt is in slot order: pooling is local
        else:
            layer.accumulate("score", stats.colsum)

    def smooth(self, scores: torch.Tensor) -> torch.Tensor:
        """1-D pooling along the slot axis (centred, stride 1, same length)."""
        if self.kernel == 1:
            return scores
        flat = scores.reshape(-1, 1, scores.shape[-1])
        pad = self.kernel // 2
        if self.pool == "max":
            pooled = F.max_pool1d(flat, self.kernel, stride=1, padding=pad)
        else:
            pooled = F.avg_pool1d(flat, self.kernel, stride=1, padding=pad, count_include_pad=False)
        return pooled.reshape(scores.shape)

    def head_scores(self, view) -> torch.Tensor:
        return view.state["score"]
