"""``streaming``: StreamingLLM (Xiao et al., arXiv 2309.17453): attention sinks plus the most recent tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from crushkv.policies.base import Host, register


@register
@dataclass
class Streaming(Host):
    """Keeps the first ``sink`` tokens and the most recent ``budget - sink`` tokens (positions stay original)."""

    name = "streaming"
    default_phase = "decode"
    shared = True
    sink: int = 4
    recent: int = 0

    def head_scores(self, view) -> torch.Tensor:
        return view.positions[:, :1, None, :].float()
