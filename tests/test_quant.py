"""The KIVI quantizer (``crushkv.quant``) against a plain per-element reference written with Python loops."""

from __future__ import annotations

import pytest
import torch

from crushkv import quant


def _reference_group(xs: list[float], bits: int) -> tuple[list[int], float, float]:
    """Asymmetric min/max quantization of one group, element by element."""
    low, high = min(xs), max(xs)
    scale = (high - low) / (2**bits - 1)
    codes = [0 if scale == 0 else min(2**bits - 1, max(0, round((x - low) / scale))) for x in xs]
    return codes, scale, low


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_round_trip_and_layout(bits):
    codes = torch.randint(0, 2**bits, (3, 5, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    packed = quant.pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, 16 * bits // 8)
    assert torch.equal(quant.unpack(packed, bits, 16), codes)
    if bits < 8:  # code j of a byte sits at bit j * bits (two 4-bit or four 2-bit codes per byte)
        per = 8 // bits
        first = sum(int(codes[0, 0, j]) << (j * bits) for j in range(per))
        assert int(packed[0, 0, 0]) == first


@pytest.mark.parametrize("bits,n", [(2, 10), (2, 3), (4, 5)])
def test_pack_ragged_last_byte(bits, n):
    """A head dim that does not fill whole bytes (Qwen2-tiny: 10 channels at 2 bits) keeps a partly used last byte."""
    codes = torch.randint(0, 2**bits, (4, n), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    packed = quant.pack(codes, bits)
    assert packed.shape == (4, -(-n * bits // 8)) == (4, quant.packed_width(n, bits))
    assert torch.equal(quant.unpack(packed, bits, n), codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_keys_per_channel_match_the_reference_and_bound(bits):
    """Keys: one range per channel over the group's tokens; error <= scale / 2 per element."""
    keys = torch.randn(2, 8, 12, generator=torch.Generator().manual_seed(0))  # [rows, G tokens, d]
    keys[:, :, 3] *= 20  # an outlier channel gets its own, wider range
    packed, scale, zero = quant.quantize_keys(keys, bits, torch.float32)
    codes = quant.unpack(packed, bits, 12)
    for r in range(2):
        for c in range(12):
            want, s, z = _reference_group(keys[r, :, c].tolist(), bits)
            assert codes[r, :, c].tolist() == want
            assert scale[r, c].item() == pytest.approx(s, rel=1e-6) and zero[r, c].item() == z
    back = quant.dequantize_keys(packed, scale[:, None], zero[:, None], bits, torch.float32)
    err = (back - keys).abs()
    assert (err <= scale[:, None] / 2 * (1 + 1e-5) + 1e-6).all()
    assert err[..., 3].max() > 10 * err[..., 0].max()  # per channel, not per tensor: the outlier's error is its own


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("d,group", [(16, 4), (12, 8), (8, 32)])
def test_values_per_token_match_the_reference_including_ragged_groups(bits, d, group):
    """Values: one range per token per ``group`` channels; a ragged last group (12 = 8 + 4) has its own range, and a
    head narrower than the group is one group."""
    values = torch.randn(3, 5, d, generator=torch.Generator().manual_seed(d))
    packed, scale, zero = quant.quantize_values(values, bits, group, torch.float32)
    size, count = quant.value_groups(d, group)
    assert scale.shape == (3, 5, count) and packed.shape == (3, 5, d * bits // 8)
    codes = quant.unpack(packed, bits, d)
    for t in range(5):
        for g in range(count):
            xs = values[1, t, g * size : (g + 1) * size].tolist()
            want, s, z = _reference_group(xs, bits)
            assert codes[1, t, g * size : g * size + len(xs)].tolist() == want
            assert scale[1, t, g].item() == pytest.approx(s, rel=1e-6) and zero[1, t, g].item() == z
    back = quant.dequantize_values(packed, scale, zero, bits, group, d, torch.float32)
    bound = scale.repeat_interleave(size, -1)[..., :d] / 2
    assert ((back - values).abs() <= bound * (1 + 1e-5) + 1e-6).all()


def test_error_shrinks_with_bits_and_constant_groups_are_exact():
    x = torch.randn(4, 32, 16, generator=torch.Generator().manual_seed(1))
    errors = []
    for bits in (2, 4, 8):
        packed, scale, zero = quant.quantize_keys(x, bits, torch.float32)
        back = quant.dequantize_keys(packed, scale[:, None], zero[:, None], bits, torch.float32)
        errors.append((back - x).abs().max())
    assert errors[0] > errors[1] > errors[2]
    constant = torch.full((1, 4, 8), 0.37)
    packed, scale, zero = quant.quantize_keys(constant, 2, torch.float32)
    assert torch.equal(scale, torch.zeros_like(scale))
    assert torch.equal(quant.dequantize_keys(packed, scale[:, None], zero[:, None], 2, torch.float32), constant)


def test_live_mask_sets_the_range_from_live_tokens_only():
    keys = torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(2))
    keys[0, 1] = 1000.0  # a dead token (evicted before its group was quantized) must not widen the range
    live = torch.tensor([[True, False, True, True]])
    _, scale, zero = quant.quantize_keys(keys, 4, torch.float32, live)
    alive = keys[0, [0, 2, 3]]
    torch.testing.assert_close(zero[0], alive.amin(0))
    torch.testing.assert_close(scale[0], (alive.amax(0) - alive.amin(0)) / 15)


def test_scales_in_a_16_bit_dtype_keep_the_bound():
    """Codes are computed from the rounded bf16 scale/zero, so the read-back error stays within scale / 2 (plus the
    bf16 rounding of the result)."""
    x = torch.randn(2, 32, 64, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    packed, scale, zero = quant.quantize_keys(x, 4, torch.bfloat16)
    assert scale.dtype == zero.dtype == torch.bfloat16
    back = quant.dequantize_keys(packed, scale[:, None], zero[:, None], 4, torch.float32)
    bound = scale[:, None].float() / 2 + x.float().abs() * 2**-8 + 1e-6
    assert ((back - x.float()).abs() <= bound).all()
