"""KVCrush building blocks (Jha et al., arXiv 2503.00022), as pure tensor functions.

1. ``indicators``: per signature head, the top half of a region's tokens by attention score get bit 1.
2. ``make_anchor``: a reference bit vector (random | mean | alternate | zeros | ones).
3. ``hamming``: distance of every signature to the anchor.
4. ``pick_representatives``: sort the host's evicted candidates by distance and keep one per equal-size bucket
   (``representative_mask``: the same set as a mask, without a sort in steady decoding).

Signatures are ``[..., T, S]`` bit matrices: token granularity uses one bit per attention head (``S`` = heads),
block granularity (OpenVINO GenAI's paged variant) one bit per token of a block (``S`` = block size).
"""

from __future__ import annotations

import torch

from crushkv.selection import to_mask, top_mask

ANCHORS = ("random", "mean", "alternate", "zeros", "ones")
PICK_RULES = ("bucket", "ovg", "linspace")


def indicators(scores: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Bit 1 for the ``floor(n/2)`` highest-scoring region tokens of each row (``n`` = region size of that row).

    ``scores``/``region``: ``[..., T]``; ties go to the earlier token, so the result is deterministic.
    """
    prio = torch.where(region, scores.float(), torch.full_like(scores, float("-inf"), dtype=torch.float32))
    half = region.sum(-1, keepdim=True) // 2
    first = half.flatten()[0] if half.numel() else None
    if first is not None and bool((half == first).all()):
        # every row keeps the same count (the usual case): O(T) selection instead of a sort
        return top_mask(prio, int(first)) & region
    order = torch.sort(prio, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order)
    )
    return (rank < half) & region


def make_anchor(
    mode: str, signatures: torch.Tensor, members: torch.Tensor | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Anchor bit vector ``[..., S]`` for signatures ``[..., T, S]``.

    ``mean`` is the per-position majority (strictly more than half of the ``members`` rows set), ``alternate`` is
    ``0,1,0,1,...``, ``random`` draws uniform bits from ``generator`` (seeded by the caller).
    """
    lead, width = signatures.shape[:-2], signatures.shape[-1]
    device = signatures.device
    if mode == "zeros":
        anchor = torch.zeros(width, dtype=torch.bool, device=device)
    elif mode == "ones":
        anchor = torch.ones(width, dtype=torch.bool, device=device)
    elif mode == "alternate":
        anchor = torch.arange(width, device=device) % 2 == 1
    elif mode == "random":
        anchor = torch.randint(0, 2, (width,), generator=generator).bool().to(device)
    elif mode == "mean":
        if members is None:
            members = torch.ones(signatures.shape[:-1], dtype=torch.bool, device=device)
        count = members.sum(-1, keepdim=True).clamp(min=1)
        ones = (signatures & members[..., None]).sum(-2)
        return ones.float() / count > 0.5
    else:
        raise ValueError(f"unknown KVCrush anchor {mode!r}; valid anchors: {', '.join(ANCHORS)}")
    return anchor.expand(*lead, width)


def hamming(signatures: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """Number of differing bits between each signature ``[..., T, S]`` and the anchor ``[..., S]``."""
    return (signatures != anchor[..., None, :]).sum(-1)


def pick_representatives(
    distance: torch.Tensor,
    candidates: torch.Tensor,
    k: int,
    rule: str = "bucket",
    fillers: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indices ``[..., k]`` of representatives: candidates sorted by distance (stable), one per equal-size bucket.

    When a row has fewer than ``k`` candidates, all of them are taken and the rest is filled from ``fillers``
    (e.g. padding slots, so tensor shapes stay equal); the caller guarantees ``candidates + fillers >= k``.
    """
    if k == 0:
        return torch.zeros(*distance.shape[:-1], 0, dtype=torch.long, device=distance.device)
    width = int(distance.max().item()) + 1 if distance.numel() else 1
    key = torch.where(candidates, distance.long(), torch.full_like(distance, width + 2, dtype=torch.long))
    if fillers is not None:
        key = torch.where(fillers & ~candidates, torch.full_like(key, width + 1), key)
    order = torch.sort(key, dim=-1, stable=True).indices
    m = candidates.sum(-1)
    k_eff = m.clamp(max=k)
    i = torch.arange(k, device=distance.device).expand(*m.shape, k)
    # ranks among candidates for the first k_eff picks; fillers (sorted right after the candidates) afterwards
    safe_k = k_eff.clamp(min=1)[..., None]
    rank = bucket_ranks(m, safe_k, i, rule)
    rank = torch.where(i < k_eff[..., None], rank, m[..., None] + i - k_eff[..., None])
    return order.gather(-1, rank)


def representative_mask(
    distance: torch.Tensor,
    candidates: torch.Tensor,
    k: int,
    rule: str = "bucket",
    fillers: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean ``[..., T]`` mask of the slots ``pick_representatives`` returns.

    Fast path for steady decoding, where every row has exactly ``k + 1`` candidates: with ``bucket``/``ovg`` picks the
    buckets have size one and the ranks kept are ``0..k-1``, i.e. the only candidate dropped is the last one in
    (distance, slot) order: the largest distance, the latest slot among ties. No sort is needed for that.
    """
    length = distance.shape[-1]
    if rule in ("bucket", "ovg") and k >= 1 and distance.numel() and bool((candidates.sum(-1) == k + 1).all()):
        key = torch.where(candidates, distance.long(), torch.full_like(distance, -1, dtype=torch.long))
        drop = length - 1 - key.flip(-1).argmax(-1, keepdim=True)
        return candidates & (torch.arange(length, device=distance.device) != drop)
    return to_mask(pick_representatives(distance, candidates, k, rule, fillers), length)


def bucket_ranks(m: torch.Tensor, k: torch.Tensor, i: torch.Tensor, rule: str) -> torch.Tensor:
    """Rank of pick ``i`` among ``m`` sorted candidates when taking ``k`` (``[..., 1]``) of them.

    ``bucket``: first element of each of ``k`` equal-size buckets, ``floor(i*m/k)``;
    ``ovg``: OpenVINO GenAI's ``i*floor(m/k)``; ``linspace``: vLLM/OV-contrib ``linspace(0, m-1, k)``.
    """
    m = m[..., None]
    if rule == "bucket":
        return torch.div(i * m, k, rounding_mode="floor")
    if rule == "ovg":
        return i * torch.div(m, k, rounding_mode="floor")
    if rule == "linspace":
        return torch.where(k > 1, torch.div(i * (m - 1), (k - 1).clamp(min=1), rounding_mode="floor"), 0)
    raise ValueError(f"unknown pick rule {rule!r}; valid: {', '.join(PICK_RULES)}")


def token_signatures(head_scores: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Per-token head-behaviour signatures ``[B, L, S]`` from per-head scores ``[B, S, L]`` over ``region [B, L]``."""
    bits = indicators(head_scores, region[:, None, :].expand_as(head_scores))
    return bits.transpose(-1, -2)
