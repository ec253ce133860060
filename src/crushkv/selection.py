"""Budgeted top-k selection over cache slots, shared by every policy.

All functions work on slot-aligned tensors of shape ``[B, H, L]`` (batch, KV heads or 1 for layer-shared, slots) and
return sorted slot indices ``[B, H, k]``. Slots are kept in sequence order by the cache, so "recent" means the last
slots and "sink" means the first *valid* slots of each row (left padding is never a sink).
"""

from __future__ import annotations

import torch

NEG = float("-inf")
POS = float("inf")


def host_sync_is_free(device: torch.device) -> bool:
    """Whether reading a tensor value back costs no device round trip (CPU): then data-dependent fast paths pay."""
    return device.type == "cpu"


def forced_mask(valid: torch.Tensor, sink: int, recent: int) -> torch.Tensor:
    """Slots that must always be kept: the first ``sink`` valid slots and the last ``recent`` slots of each row."""
    length = valid.shape[-1]
    forced = valid & (valid.long().cumsum(-1) <= sink) if sink > 0 else torch.zeros_like(valid)
    if recent > 0:
        forced = forced.clone()
        forced[..., max(0, length - recent) :] = True
    return forced & valid


def priority(scores: torch.Tensor, forced: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Scores with forced slots lifted to +inf and padding dropped to -inf (forced wins over nothing else)."""
    out = torch.where(valid, scores.float(), torch.full_like(scores, NEG, dtype=torch.float32))
    return torch.where(forced, torch.full_like(out, POS), out)


def top_mask(prio: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` highest-priority slots per row; among equal priorities the earlier slots win.

    Same result as a stable descending sort cut at ``k``, in O(L) per row: the ``k``-th largest value is found by
    selection (``kthvalue``) and only ties at that value are resolved by position.
    """
    length = prio.shape[-1]
    if k > length:
        raise ValueError(f"cannot keep {k} slots out of {length}")
    if k <= 0:
        return torch.zeros_like(prio, dtype=torch.bool)
    if k == length:
        return torch.ones_like(prio, dtype=torch.bool)
    kth = torch.kthvalue(prio, length - k + 1, dim=-1, keepdim=True).values
    if host_sync_is_free(prio.device):  # skip the tie resolution when no row needs it
        at_least = prio >= kth
        if bool((at_least.sum(-1) == k).all()):
            return at_least
    return _resolve_ties(prio, kth, k)


def _resolve_ties(prio: torch.Tensor, kth: torch.Tensor, k: int) -> torch.Tensor:
    """Slots above the ``k``-th value plus the earliest slots equal to it, up to ``k`` per row (no host sync)."""
    above = prio > kth
    tie = prio == kth
    need = k - above.sum(-1, keepdim=True)
    return above | (tie & (tie.cumsum(-1) <= need))


def mask_to_indices(mask: torch.Tensor, k: int) -> torch.Tensor:
    """Ascending indices ``[..., k]`` of the set slots of a mask with exactly ``k`` set slots per row.

    ``nonzero`` on CPU; elsewhere a cumsum and a scatter, no sort and no host synchronisation.
    """
    length = mask.shape[-1]
    if host_sync_is_free(mask.device):  # nonzero syncs, but it is one pass
        found = mask.nonzero()[:, -1]
        if found.numel() == mask.numel() // max(1, length) * k:
            return found.view(*mask.shape[:-1], k)
    return _scatter_indices(mask, k)


def _scatter_indices(mask: torch.Tensor, k: int) -> torch.Tensor:
    """``mask_to_indices`` without a host sync: each set slot's running count is its output position."""
    length = mask.shape[-1]
    pos = torch.where(mask, mask.long().cumsum(-1) - 1, k)
    out = torch.empty(*mask.shape[:-1], k + 1, dtype=torch.long, device=mask.device)
    src = torch.arange(length, device=mask.device).expand_as(pos)
    return out.scatter_(-1, pos, src)[..., :k]


def topk_slots(prio: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest-priority slots per row, ascending (ties broken towards earlier slots)."""
    length = prio.shape[-1]
    if k > length:
        raise ValueError(f"cannot keep {k} slots out of {length}")
    if k == length - 1:
        # steady decoding state: drop one slot, the last of the lowest-priority ones (what the stable sort drops)
        drop = length - 1 - prio.flip(-1).argmin(-1, keepdim=True)
        keep = torch.arange(k, device=prio.device).expand(*prio.shape[:-1], k)
        return keep + (keep >= drop).long()
    return mask_to_indices(top_mask(prio, k), k)


def select_topk(scores: torch.Tensor, k: int, valid: torch.Tensor, sink: int, recent: int) -> torch.Tensor:
    """Keep ``k`` slots per row: forced sink/recent slots first, then the highest scores among valid slots."""
    forced = forced_mask(valid, sink, recent)
    return topk_slots(priority(scores, forced, valid), k)


def to_mask(indices: torch.Tensor, length: int) -> torch.Tensor:
    """Boolean ``[..., length]`` mask of the given slot indices."""
    mask = torch.zeros(*indices.shape[:-1], length, dtype=torch.bool, device=indices.device)
    return mask.scatter_(-1, indices, True)
