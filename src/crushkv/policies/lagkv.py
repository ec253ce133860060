"""``lagkv``: LagKV (Liang et al., arXiv 2504.04704): tokens scored against the range of the tokens after them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from crushkv.policies.base import Host, register


@register
@dataclass
class LagKV(Host):
    """Attention-free. After the sink, the tokens are cut into partitions of ``lag``; each channel of a token's key
    (and value) is normalised by the min/max of that channel over the *next* partition, and the token scores the
    spread (std) of its normalised channels, softmaxed within its partition. Key and value scores are averaged and
    turned into ranks within the partition, so every partition keeps about the same share. The last partition has no
    reference and is kept first; a sequence too short for two partitions keeps its latest tokens first.
    """

    name = "lagkv"
    lag: int = 128

    def validate(self) -> None:
        super().validate()
        if isinstance(self.lag, bool) or not isinstance(self.lag, int) or self.lag < 1:
            raise ValueError(f"lagkv: lag must be an int >= 1, got {self.lag!r}")

    def head_scores(self, view) -> torch.Tensor:
        keys, values = view.cached_keys().float(), view.cached_values().float()
        b, h, n, _ = keys.shape
        scores = torch.ones(b, h, n, device=keys.device)
        for bi in range(b):
            for hi in range(h):
                slots = view.valid[bi, hi].nonzero().squeeze(1)
                slots = slots[view.positions[bi, hi, slots].argsort()]  # in sequence order, whatever the layout
                body = slots[self.sink :]
                parts = body.numel() // self.lag
                if parts < 2:  # nothing to compare against: the latest tokens first
                    scores[bi, hi, body] = torch.arange(1, body.numel() + 1, device=keys.device) / max(1, body.numel())
                    continue
                scored = body[: parts * self.lag].view(parts, self.lag)
                lagged = (self._spread(keys[bi, hi, scored]) + self._spread(values[bi, hi, scored])) / 2
                ranks = lagged.argsort(-1).argsort(-1).float() / self.lag  # [parts - 1, lag], in [0, 1)
                scores[bi, hi, scored[:-1].flatten()] = ranks.flatten()
        return scores[:, :, None, :]

    @staticmethod
    def _spread(states: torch.Tensor) -> torch.Tensor:
        """``[parts, lag, d]`` -> ``[parts - 1, lag]``: softmax over a partition of the std of each token's channels
        normalised by the next partition's per-channel min/max."""
        reference = states[1:]
        low, high = reference.amin(1, keepdim=True), reference.amax(1, keepdim=True)
        normalised = (states[:-1] - low) / (high - low).clamp(min=1e-6)
        return normalised.std(-1).softmax(-1)
