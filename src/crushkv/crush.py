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

import functools

import torch

from crushkv.selection import host_sync_is_free, to_mask, top_mask

ANCHORS = ("random", "mean", "alternate", "zeros", "ones")
PICK_RULES = ("bucket", "ovg", "linspace")


def indicators(scores: torch.Tensor, region: torch.Tensor, order: torch.Tensor | None = None) -> torch.Tensor:
    """Bit 1 for the ``floor(n/2)`` highest-scoring region tokens of each row (``n`` = region size of that row).

    ``scores``: ``[..., T]``, ``region`` broadcastable to it; ties go to the earlier token (``order``: per-slot
    token order keys, ``None`` when slot order is token order), so the bits are deterministic.
    """
    prio = torch.where(region, scores.float(), float("-inf"))
    half = region.sum(-1, keepdim=True) // 2
    common = _common_value(half)
    if common is not None:  # every row keeps the same count (the usual case): O(T) selection instead of a sort
        return top_mask(prio, common, None if order is None else order.expand_as(prio)) & region
    rank = _descending_rank(prio, order)
    return (rank < half) & region


def _descending_rank(prio: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """Rank of every slot in a sort by descending priority, ties by token order."""
    if order is None:
        perm = torch.sort(prio, dim=-1, descending=True, stable=True).indices
    else:
        by_order = order.expand_as(prio).argsort(-1)
        perm = by_order.gather(-1, torch.sort(prio.gather(-1, by_order), dim=-1, descending=True, stable=True).indices)
    return torch.empty_like(perm).scatter_(-1, perm, torch.arange(perm.shape[-1], device=perm.device).expand_as(perm))


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
        ones = (signatures & members[..., None]).sum(-2)
        return ones * 2 > members.sum(-1, keepdim=True)  # strictly more than half (no member: all zeros)
    else:
        raise ValueError(f"unknown KVCrush anchor {mode!r}; valid anchors: {', '.join(ANCHORS)}")
    return anchor.expand(*lead, width)


def hamming(signatures: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """Number of differing bits between each signature ``[..., T, S]`` and the anchor ``[..., S]``."""
    return (signatures != anchor[..., None, :]).sum(-1)


#: largest presence table (booleans) the sort-free bucket picks may allocate; bigger problems take the sort
PRESENCE_TABLE_ELEMENTS = 1 << 24

#: sort classes of the slots that are not candidates: fillers first, then the rest (above any distance)
_FILLER_KEY, _OTHER_KEY = 1 << 17, 1 << 18
#: a sort key is ``class << _ORDER_BITS | token order`` (token order keys stay below 2**44: n * seen < 1.7e13)
_ORDER_BITS = 44


def _sort_keys(cls: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """Unique keys sorting by ``cls`` (distance or filler/other class), then by token order (or slot index)."""
    if order is None:
        order = torch.arange(cls.shape[-1], device=cls.device)
    return (cls.long() << _ORDER_BITS) | order


def pick_representatives(
    distance: torch.Tensor,
    candidates: torch.Tensor,
    k: int,
    rule: str = "bucket",
    fillers: torch.Tensor | None = None,
    order: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indices ``[..., k]`` of representatives: candidates sorted by distance (stable), one per equal-size bucket.

    When a row has fewer than ``k`` candidates, all of them are taken and the rest is filled from ``fillers``
    (e.g. padding slots, so tensor shapes stay equal); the caller guarantees ``candidates + fillers >= k``.
    """
    m = candidates.sum(-1)
    return _pick(distance, candidates, k, rule, fillers, m, _common_value(m), order)


def _pick(
    distance: torch.Tensor,
    candidates: torch.Tensor,
    k: int,
    rule: str,
    fillers: torch.Tensor | None,
    m: torch.Tensor,
    common_m: int | None,
    order: torch.Tensor | None,
) -> torch.Tensor:
    """``pick_representatives`` given the candidate count ``m`` of every row (``common_m``: their common value)."""
    if k == 0:
        return torch.zeros(*distance.shape[:-1], 0, dtype=torch.long, device=distance.device)
    if order is None and common_m is not None and common_m >= k and host_sync_is_free(distance.device):
        width = int(distance.max()) + 1 if distance.numel() else 1
        if distance.numel() * width <= PRESENCE_TABLE_ELEMENTS:
            return _pick_by_presence(distance, candidates, common_m, width, _common_ranks(common_m, k, rule))
    others = _OTHER_KEY if fillers is None else torch.where(fillers, _FILLER_KEY, _OTHER_KEY)
    cls = torch.where(candidates, distance.long(), torch.as_tensor(others, device=distance.device))
    ranked = torch.sort(_sort_keys(cls, order), dim=-1).indices
    i = torch.arange(k, device=distance.device)
    if common_m is not None:  # the same count in every row (no padding): one rank list for all rows
        return ranked.index_select(-1, _ranks(m.new_tensor(common_m), min(common_m, k), i, rule))
    return ranked.gather(-1, _ranks(m, m.clamp(max=k)[..., None], i.expand(*m.shape, k), rule))


def _pick_by_presence(
    distance: torch.Tensor, candidates: torch.Tensor, m: int, width: int, ranks: torch.Tensor
) -> torch.Tensor:
    """Candidates at sorted positions ``ranks`` when every row has ``m`` of them, without a sort (CPU).

    Distances are small integers below ``width``, so ``(distance, slot)`` is a unique key below ``width * L``: marking
    each candidate's key in a presence table and reading the marks back in order (``nonzero``) lists the candidates
    in the stable sort's order.
    """
    length = distance.shape[-1]
    keys = distance.long() * length + torch.arange(length, device=distance.device)
    table = torch.zeros(*keys.shape[:-1], width * length, dtype=torch.bool, device=keys.device)
    table.scatter_(-1, keys, candidates)
    order = table.nonzero()[:, -1].view(*keys.shape[:-1], m)
    return order.index_select(-1, ranks).remainder_(length)


@functools.lru_cache(maxsize=256)
def _common_ranks(m: int, k: int, rule: str) -> torch.Tensor:
    """CPU rank list of ``k <= m`` picks among ``m`` candidates (the same for every decode cut of a layer)."""
    return bucket_ranks(torch.tensor(m), torch.tensor(k), torch.arange(k), rule)


def _ranks(m: torch.Tensor, k_eff, i: torch.Tensor, rule: str) -> torch.Tensor:
    """Sorted positions taken: ``k_eff`` bucket picks among the ``m`` candidates, then the fillers after them."""
    picks = bucket_ranks(m, torch.as_tensor(k_eff, device=m.device).clamp(min=1), i, rule)
    return torch.where(i < k_eff, picks, m[..., None] + i - k_eff)


def representative_mask(
    distance: torch.Tensor,
    candidates: torch.Tensor,
    k: int | torch.Tensor,
    rule: str = "bucket",
    fillers: torch.Tensor | None = None,
    order: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean ``[..., T]`` mask of the slots ``pick_representatives`` returns.

    Fast path for steady decoding, where every row has exactly ``k + 1`` candidates: with ``bucket``/``ovg`` picks the
    buckets have size one and the ranks kept are ``0..k-1``, i.e. the only candidate dropped is the last one in
    (distance, token order): the largest distance, the latest token among ties. No sort is needed for that.

    ``k`` may be a tensor of per-row counts (``[...]``, see ``ragged_quota``); rows then keep ``min(k, m)``
    candidates and nothing else.
    """
    length = distance.shape[-1]
    m = candidates.sum(-1)
    if isinstance(k, torch.Tensor):
        return _quota_mask(distance, candidates, k, rule, m, order)
    common_m = _common_value(m)
    if rule in ("bucket", "ovg") and k >= 1 and common_m == k + 1:
        key = torch.where(candidates, _sort_keys(distance, order), -1)
        drop = key.argmax(-1, keepdim=True)
        return candidates & (torch.arange(length, device=distance.device) != drop)
    return to_mask(_pick(distance, candidates, k, rule, fillers, m, common_m, order), length)


def _quota_mask(
    distance: torch.Tensor,
    candidates: torch.Tensor,
    quota: torch.Tensor,
    rule: str,
    m: torch.Tensor,
    order: torch.Tensor | None,
) -> torch.Tensor:
    """``representative_mask`` with a count per row: bucket picks among each row's candidates, no fillers."""
    width = int(quota.max()) if quota.numel() else 0
    if width == 0:
        return torch.zeros_like(candidates)
    cls = torch.where(candidates, distance.long(), torch.as_tensor(_OTHER_KEY, device=distance.device))
    ranked = torch.sort(_sort_keys(cls, order), dim=-1).indices
    take = torch.minimum(m, quota)[..., None]
    i = torch.arange(width, device=distance.device).expand(*m.shape, width)
    ranks = bucket_ranks(m, take.clamp(min=1), i, rule).clamp(max=distance.shape[-1] - 1)
    picks = ranked.gather(-1, ranks)
    picks = torch.where(i < take, picks, picks[..., :1])  # past a row's count: repeat its first pick
    return to_mask(picks, distance.shape[-1]) & (take > 0)


def ragged_quota(m: torch.Tensor, k: int) -> torch.Tensor:
    """Per-head counts ``[B, H]`` that sum to ``min(H * k, sum(m))`` per row, each within its ``m`` candidates.

    Ragged hosts (KVzip, Ada-KV) may leave a head with fewer than ``k`` evicted slots; the representatives it cannot
    take go to the next heads with spare candidates (in head order), so the row still holds its whole budget.
    """
    base = m.clamp(max=k)
    spare = m - base
    left = (m.shape[-1] * k - base.sum(-1, keepdim=True)).clamp(min=0)
    before = spare.cumsum(-1) - spare
    return base + (left - before).clamp(min=0).minimum(spare)


def _common_value(counts: torch.Tensor) -> int | None:
    """The value every element of ``counts`` has, or ``None`` (also for an empty tensor); one host sync."""
    if not counts.numel():
        return None
    low, high = (int(v) for v in torch.aminmax(counts))
    return low if low == high else None


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
    bits = indicators(head_scores, region[:, None, :])  # the region broadcasts over the heads
    return bits.transpose(-1, -2)
