"""``keydiff``: KeyDiff (Park et al., arXiv 2504.15364): keep the keys least like the layer's average key."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from crushkv.policies.base import Host, register


@register
@dataclass
class KeyDiff(Host):
    """Score = minus the cosine similarity of each key to the mean of the head's normalised keys (attention-free).

    The mean runs over the head's real tokens only (free and padding slots excluded), so the score does not depend
    on the slot layout.
    """

    name = "keydiff"

    def head_scores(self, view) -> torch.Tensor:
        keys = view.cached_keys().float()
        valid = view.valid[..., None].to(keys.dtype)
        unit = F.normalize(keys, dim=-1) * valid
        anchor = unit.sum(-2, keepdim=True) / valid.sum(-2, keepdim=True).clamp(min=1)
        return -F.cosine_similarity(keys, anchor, dim=-1)[:, :, None, :]
