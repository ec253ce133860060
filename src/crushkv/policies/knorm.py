"""``knorm``: keep low-norm keys (Devoto et al., arXiv 2406.11430); needs no attention statistics."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from crushkv.policies.base import Host, register


@register
@dataclass
class KNorm(Host):
    """Score = minus the L2 norm of each cached key, per KV head."""

    name = "knorm"

    def head_scores(self, view) -> torch.Tensor:
        return -view.cached_keys().float().norm(dim=-1)[:, :, None, :]
