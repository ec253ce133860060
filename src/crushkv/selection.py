"""Budgeted top-k selection over cache slots, shared by every policy.

All functions work on slot-aligned tensors of shape ``[B, H, n]`` (batch, KV heads or 1 for layer-shared, slots)
and return boolean keep masks of the same shape. Slots are not kept in sequence order (new tokens are written into
freed slots), so everything that depends on order reads the tokens' logical positions:

* "sink" is the first ``sink`` real tokens of a row (``start`` = position of its first non-padding token) and
  "recent" the last ``recent`` positions;
* ties between equal priorities go to the earlier token. ``order`` is a unique int64 key per slot that increases
  with the token's position (``order_keys``), or ``None`` when slot order already is position order (a layer that
  has never been written out of order), which lets the fast paths work on slot indices directly.
"""

from __future__ import annotations

import torch

NEG = float("-inf")
POS = float("inf")
#: sort key of slots that take no part in a tie (above every ``order_keys`` value)
_OUTSIDE = torch.iinfo(torch.long).max


def host_sync_is_free(device: torch.device) -> bool:
    """Whether reading a tensor value back costs no device round trip (CPU): then data-dependent fast paths pay."""
    return device.type == "cpu"


def order_keys(positions: torch.Tensor) -> torch.Tensor:
    """Unique per-row sort keys increasing with position (free slots may repeat a position: the slot breaks it)."""
    n = positions.shape[-1]
    return positions * n + torch.arange(n, device=positions.device)


def forced_mask(
    positions: torch.Tensor, valid: torch.Tensor, start: torch.Tensor, seen: int, sink: int, recent: int
) -> torch.Tensor:
    """Slots that must always be kept: each row's first ``sink`` real tokens and the last ``recent`` positions.

    ``start``: ``[B]`` position of each row's first non-padding token (left padding is never a sink).
    """
    forced = torch.zeros_like(valid)
    if sink > 0:
        forced |= positions < (start.view(-1, *([1] * (positions.dim() - 1))) + sink)
    if recent > 0:
        forced |= positions >= seen - recent
    return forced & valid


def priority(scores: torch.Tensor, forced: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Scores with forced slots lifted to +inf and invalid slots dropped to -inf (forced wins over nothing else)."""
    out = torch.where(valid, scores.float(), torch.full_like(scores, NEG, dtype=torch.float32))
    return torch.where(forced, torch.full_like(out, POS), out)


def top_mask(prio: torch.Tensor, k: int, order: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask of the ``k`` highest-priority slots per row; among equal priorities the earlier tokens win.

    Same result as a stable descending sort by (priority, token order) cut at ``k``, in O(n) per row: the ``k``-th
    largest value is found by selection (``kthvalue``) and only ties at that value are resolved by order.
    """
    length = prio.shape[-1]
    if k > length:
        raise ValueError(f"cannot keep {k} slots out of {length}")
    if k <= 0:
        return torch.zeros_like(prio, dtype=torch.bool)
    if k == length:
        return torch.ones_like(prio, dtype=torch.bool)
    if k == length - 1:
        return _drop_one(prio, order)
    kth = torch.kthvalue(prio, length - k + 1, dim=-1, keepdim=True).values
    if host_sync_is_free(prio.device):  # skip the tie resolution when no row needs it
        at_least = prio >= kth
        if bool((at_least.sum(-1) == k).all()):
            return at_least
    return _resolve_ties(prio, kth, k, order)


def _drop_one(prio: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """Steady decoding: drop one slot per row, the latest token among the lowest priorities (what the sort drops)."""
    length = prio.shape[-1]
    lowest = prio == prio.amin(-1, keepdim=True)
    if order is None:
        drop = length - 1 - lowest.flip(-1).long().argmax(-1, keepdim=True)
    else:
        drop = torch.where(lowest, order, -1).argmax(-1, keepdim=True)
    return torch.ones_like(prio, dtype=torch.bool).scatter_(-1, drop, False)


def _resolve_ties(prio: torch.Tensor, kth: torch.Tensor, k: int, order: torch.Tensor | None) -> torch.Tensor:
    """Slots above the ``k``-th value plus the earliest tokens equal to it, up to ``k`` per row (no host sync)."""
    above = prio > kth
    tie = prio == kth
    need = k - above.sum(-1, keepdim=True)
    if order is None:
        return above | (tie & (tie.cumsum(-1) <= need))
    key = torch.where(tie, order, _OUTSIDE)
    threshold = key.sort(-1).values.gather(-1, (need - 1).clamp(min=0))
    return above | (tie & (key <= threshold) & (need > 0))


def mask_to_indices(mask: torch.Tensor, k: int) -> torch.Tensor:
    """Ascending indices ``[..., k]`` of the set slots of a mask with exactly ``k`` set slots per row.

    ``nonzero`` on CPU; elsewhere a cumsum and a scatter, no sort and no host synchronisation.
    """
    length = mask.shape[-1]
    if host_sync_is_free(mask.device):  # nonzero syncs, but it is one pass
        found = mask.nonzero()[:, -1]
        if found.numel() == mask.numel() // max(1, length) * k:
            return found.view(*mask.shape[:-1], k)
    pos = torch.where(mask, mask.long().cumsum(-1) - 1, k)
    out = torch.empty(*mask.shape[:-1], k + 1, dtype=torch.long, device=mask.device)
    src = torch.arange(length, device=mask.device).expand_as(pos)
    return out.scatter_(-1, pos, src)[..., :k]


def select_topk(
    scores: torch.Tensor, k: int, valid: torch.Tensor, forced: torch.Tensor, order: torch.Tensor | None = None
) -> torch.Tensor:
    """Keep mask with ``k`` slots per row: forced slots first, then the highest scores among valid slots.

    A row with fewer than ``k`` valid slots keeps all of them (never a free or padding slot).
    """
    return top_mask(priority(scores, forced, valid), k, order) & valid


def to_mask(indices: torch.Tensor, length: int) -> torch.Tensor:
    """Boolean ``[..., length]`` mask of the given slot indices."""
    mask = torch.zeros(*indices.shape[:-1], length, dtype=torch.bool, device=indices.device)
    return mask.scatter_(-1, indices, True)
