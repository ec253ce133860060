"""``expected_attention``: Expected Attention (Devoto et al., arXiv 2510.00636; kvpress ``ExpectedAttentionPress``).

The attention future queries will pay to each key, estimated from the statistics of the prompt's queries: with
pre-RoPE queries ``q ~ N(mu, Sigma)`` per query head and ``R`` the rotation averaged over the next ``future``
positions, ``E[exp(q.k / sqrt(d))] = exp(k.(R mu) / sqrt(d) + k^T (R Sigma R^T) k / (2 d))``. The scores are those
logits softmaxed over the head's real tokens (sink excluded), averaged over the query heads of each KV head and
multiplied by the value norm (``vnorm``, plus ``epsilon``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from crushkv.policies.base import Host, register
from crushkv.rope import mean_rotation, unrotate
from crushkv.stats import Stats, StatsRequest

LOGITS, VNORM, STATISTICS = "ea_logits", "ea_vnorm", "expected_attention_statistics"


@register
@dataclass
class ExpectedAttention(Host):
    """Expected attention of future queries (query mean/covariance of the prompt, averaged future RoPE), x value norm.

    Needs no attention weights. ``future``: positions after the prompt the rotation is averaged over;
    ``covariance``: include the query covariance term; ``vnorm``: weight by ``||v||``; ``epsilon``: added before.
    """

    name = "expected_attention"
    sink: int = 4
    recent: int = 0
    future: int = 512
    covariance: bool = True
    vnorm: bool = True
    epsilon: float = 0.0

    def validate(self) -> None:
        super().validate()
        if isinstance(self.future, bool) or not isinstance(self.future, int) or self.future < 1:
            raise ValueError(f"expected_attention: future must be an int >= 1, got {self.future!r}")
        if not isinstance(self.epsilon, (int, float)) or self.epsilon < 0:
            raise ValueError(f"expected_attention: epsilon must be >= 0, got {self.epsilon!r}")

    def request(self, first: bool, q_len: int) -> StatsRequest:
        return StatsRequest(queries=True)

    def observe(self, layer, stats: Stats, first: bool) -> None:
        if first:  # the prompt's queries define the statistics once; later keys are scored against them
            layer.extras[STATISTICS] = self._query_statistics(stats, layer)
        mean, cov = layer.extras[STATISTICS]
        keys = stats.keys.float()  # [B, Hk, q, d] after RoPE, as cached
        b, hk, _, d = keys.shape
        g = mean.shape[1] // hk
        mean = mean.view(b, hk, g, d)
        logits = torch.einsum("bhnd,bhgd->bhgn", keys, mean) / math.sqrt(d)
        if cov is not None:
            spread = torch.einsum("bhnd,bhgde,bhne->bhgn", keys, cov.view(b, hk, g, d, d), keys)
            logits = logits + spread / (2 * d)
        layer.set_new(LOGITS, logits)
        layer.set_new(VNORM, stats.values.float().norm(dim=-1)[:, :, None, :])

    def _query_statistics(self, stats: Stats, layer) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mean ``[B, Hq, d]`` and covariance ``[B, Hq, d, d]`` of the prompt's pre-RoPE queries (padding and the
        first ``sink`` real tokens excluded), rotated by the RoPE averaged over the ``future`` next positions."""
        query = stats.query.float()  # [B, Hq, q, d] after RoPE
        cos, sin = stats.rope(stats.rope_positions.clamp(min=0), stats.layer_type)
        pre = unrotate(query, cos[:, None], sin[:, None])
        q = query.shape[2]
        logical = torch.arange(layer.seen - q, layer.seen, device=query.device)
        weight = (stats.row_valid & (logical[None] >= layer.start[:, None] + self.sink)).float()
        if not bool((weight.sum(-1) > 0).all()):  # a prompt no longer than the sink: use all its real tokens
            weight = stats.row_valid.float()
        weight = weight / weight.sum(-1, keepdim=True).clamp(min=1)
        mean = torch.einsum("bhqd,bq->bhd", pre, weight)
        cov = None
        if self.covariance:
            centred = pre - mean[:, :, None]
            cov = torch.einsum("bhqd,bq,bhqe->bhde", centred, weight, centred)
        # the next ``future`` positions after the prompt's last (real, left padding) token
        future = stats.rope_positions[:, -1:] + 1 + torch.arange(self.future, device=query.device)
        rotation = mean_rotation(*stats.rope(future, stats.layer_type))[:, None]  # [B, 1, d, d]
        mean = (rotation @ mean[..., None]).squeeze(-1)
        if cov is not None:
            cov = rotation @ cov @ rotation.transpose(-1, -2)
        return mean, cov

    def head_scores(self, view) -> torch.Tensor:
        logits = view.state[LOGITS]  # [B, Hk, G, n]
        region = view.valid & (view.positions >= view.start[:, None, None] + self.sink)
        probs = torch.where(region[:, :, None], logits, float("-inf")).softmax(-1).nan_to_num(0.0)
        scores = probs.mean(2, keepdim=True)
        if self.vnorm:
            scores = (scores + self.epsilon) * view.state[VNORM]
        return scores
