"""The low-precision tier (``tier=``, ``reps=``) against a plain reference: keys per channel over groups of
``group`` consecutive slots of a row (the open group exact), values per token; ragged rows; added in pieces."""

from __future__ import annotations

import pytest
import torch

from crushkv import quant
from crushkv.stores.tier import LowTier


def _reference_keys(keys: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """One row's keys ``[n, d]`` as the tier should hold them: whole groups quantized per channel, the rest exact."""
    n, full = keys.shape[0], keys.shape[0] // group * group
    out = keys.clone()
    if full:
        packed, scale, zero = quant.quantize_keys(keys[:full].view(-1, group, keys.shape[1]), bits, keys.dtype)
        codes = quant.unpack(packed, bits, keys.shape[1])
        out[:full] = quant.dequantize(codes, scale[:, None], zero[:, None], keys.dtype).reshape(full, -1)
    return out[:n]


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_tier_keys_per_channel_in_whole_groups_and_the_open_group_exact(bits: int) -> None:
    gen = torch.Generator().manual_seed(0)
    b, h, n, d, group = 2, 3, 50, 16, 8
    scales = torch.linspace(0.1, 20.0, d)  # outlier channels, as keys have
    keys = torch.randn(b, h, n, d, generator=gen) * scales
    values = torch.randn(b, h, n, d, generator=gen)
    positions = torch.arange(n).expand(b, h, n)
    tier = LowTier(bits, group)
    order = torch.randperm(n, generator=gen)
    # demoted in three pieces of different sizes per row (ragged rows), in no position order
    taken = torch.zeros(b, h, n, dtype=torch.bool)
    arrived: dict[tuple[int, int], list[int]] = {(r, k): [] for r in range(b) for k in range(h)}
    for stop in (7, 30, n):
        freed = torch.zeros(b, h, n, dtype=torch.bool)
        for r in range(b):
            for k in range(h):
                upto = stop if (r + k) % 2 == 0 else min(n, stop + 5)
                for slot in order[:upto].tolist():
                    if not taken[r, k, slot]:
                        freed[r, k, slot] = taken[r, k, slot] = True
        for r, k, slot in freed.nonzero().tolist():
            arrived[r, k].append(slot)
        tier.add(freed, positions, keys, values)
        got_k, got_v, got_pos, valid = tier.dense()
        for (r, k), slots in arrived.items():
            m = len(slots)
            assert int(tier.counts[r, k]) == m and valid[r, k, :m].all() and not valid[r, k, m:].any()
            assert got_pos[r, k, :m].tolist() == slots  # slots fill in arrival order
            want = _reference_keys(keys[r, k, slots], bits, group)
            torch.testing.assert_close(got_k[r, k, :m], want, atol=1e-5, rtol=1e-5)
            packed, s, z = quant.quantize_values(values[r, k, slots], bits, group, values.dtype)
            want_v = quant.dequantize_values(packed, s, z, bits, group, d, values.dtype)
            torch.testing.assert_close(got_v[r, k, :m], want_v)


def test_per_channel_tier_keys_keep_outlier_heads_far_closer_than_per_token() -> None:
    """Why keys are grouped by channel: with outlier channels, per-token 4-bit ranges lose the small channels."""
    gen = torch.Generator().manual_seed(1)
    keys = torch.randn(1, 1, 64, 32, generator=gen) * torch.linspace(0.1, 20.0, 32)
    tier = LowTier(4, 32)
    tier.add(torch.ones(1, 1, 64, dtype=torch.bool), torch.arange(64).view(1, 1, 64), keys, keys)
    packed, s, z = quant.quantize_values(keys, 4, 32, keys.dtype)
    by_token = quant.dequantize_values(packed, s, z, 4, 32, 32, keys.dtype)

    def channel_error(x: torch.Tensor) -> float:  # mean over channels of the relative error
        return float(((x - keys).norm(dim=2) / keys.norm(dim=2)).mean())

    per_channel, per_token = channel_error(tier.dense()[0]), channel_error(by_token)
    assert per_channel < 0.25 * per_token, (per_channel, per_token)
