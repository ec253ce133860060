"""``tova``: Token Omission Via Attention (Oren et al., arXiv 2401.06104): last query's attention, layer-shared."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from crushkv.policies.base import Host, register
from crushkv.stats import Stats, StatsRequest


@register
@dataclass
class TOVA(Host):
    """Drops the tokens the current (last) query attends to least, averaged over all heads of the layer."""

    name = "tova"
    default_phase = "decode"
    shared = True
    sink: int = 0
    recent: int = 1

    def request(self, first: bool, q_len: int) -> StatsRequest:
        return StatsRequest(last=True)

    def observe(self, layer, stats: Stats, first: bool) -> None:
        layer.set_state("last", stats.last)

    def head_scores(self, view) -> torch.Tensor:
        return view.state["last"]
