"""KIVI-style asymmetric min/max quantization and bit packing: the arithmetic only (storage: ``stores/quant.py``).

A group of values ``x`` is stored as codes ``q = clamp(round((x - zero) / scale), 0, 2^b - 1)`` with
``zero = min(x)`` and ``scale = (max(x) - min(x)) / (2^b - 1)``; it reads back as ``q * scale + zero``, so each
element is off by at most ``scale / 2``. Keys are grouped per channel over ``group`` tokens (outlier channels get
their own range), values per token over ``group`` channels (KIVI, arXiv 2402.02750).

``scale``/``zero`` are kept in the model's dtype, and the codes are computed from those rounded parameters, so what
the store reads back is exactly what the error bound describes. Codes are packed along the channel axis of each
token (two 4-bit or four 2-bit codes per byte), so one token's codes are one row of bytes: a slot can be copied
(compaction) without touching its neighbours.
"""

from __future__ import annotations

import torch

#: ``quant=`` spec values and their bit widths (``none``: full precision)
BITS = {"int8": 8, "int4": 4, "int2": 2}
QUANT_MODES = ("none", *BITS)
#: ``tier=`` spec values: what happens to evicted tokens (``drop``: freed)
TIER_MODES = ("drop", *BITS)


def levels(bits: int) -> int:
    """Largest code of a ``bits``-bit quantizer."""
    return (1 << bits) - 1


def packed_width(d: int, bits: int) -> int:
    """Bytes holding ``d`` codes of ``bits`` bits (a last byte partly used when ``d * bits`` is not a multiple of 8)."""
    return -(-d * bits // 8)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``[..., n]`` uint8 codes below ``2^bits`` -> ``[..., ceil(n * bits / 8)]`` bytes, code ``j`` of a byte at bit
    ``j * bits`` (a ragged last byte is padded with zero codes)."""
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes
    per, n = 8 // bits, codes.shape[-1]
    width = packed_width(n, bits)
    if width * per != n:
        codes = torch.cat([codes, codes.new_zeros(*codes.shape[:-1], width * per - n)], dim=-1)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    grouped = codes.view(*codes.shape[:-1], width, per) << shifts
    out = grouped[..., 0]
    for j in range(1, per):
        out = out | grouped[..., j]
    return out


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack``: ``[..., w]`` bytes -> the first ``n`` uint8 codes ``[..., n]``."""
    if bits == 8:
        return packed
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed[..., None] >> shifts) & levels(bits)
    codes = codes.view(*packed.shape[:-1], packed.shape[-1] * (8 // bits))
    return codes if codes.shape[-1] == n else codes[..., :n]


_CODE_TABLES: dict[tuple[int, torch.device], torch.Tensor] = {}


def code_table(bits: int, device: torch.device) -> torch.Tensor:
    """``[256, 8 / bits]`` fp32: the codes packed in each byte value, so unpacking is one row lookup per byte
    (cheaper than shifting and masking every code, then converting it)."""
    key = (bits, torch.device(device))
    if key not in _CODE_TABLES:
        byte = torch.arange(256, dtype=torch.uint8, device=device)
        _CODE_TABLES[key] = unpack(byte[:, None], bits, 8 // bits).float()
    return _CODE_TABLES[key]


def minmax(x: torch.Tensor, dim: int, bits: int, dtype: torch.dtype, live: torch.Tensor | None = None):
    """``(scale, zero)`` of the groups of ``x`` along ``dim`` (removed), rounded to ``dtype``.

    ``live`` (broadcastable to ``x``) excludes entries from the range: a group whose entries are all excluded gets
    ``scale = zero = 0``.
    """
    x = x.float()
    if live is None:
        low, high = x.amin(dim), x.amax(dim)
    else:
        low = x.masked_fill(~live, float("inf")).amin(dim)
        high = x.masked_fill(~live, float("-inf")).amax(dim)
        empty = torch.isinf(low)
        low, high = low.masked_fill(empty, 0.0), high.masked_fill(empty, 0.0)
    return ((high - low) / levels(bits)).to(dtype), low.to(dtype)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes of ``x`` with ``scale``/``zero`` broadcast against it (a zero scale, a constant group, gives 0)."""
    scale, zero = scale.float(), zero.float()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return ((x.float() - zero) / safe).round_().clamp_(0, levels(bits)).to(torch.uint8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``codes * scale + zero`` in fp32, returned in ``dtype``."""
    return torch.addcmul(zero.float(), codes.float(), scale.float()).to(dtype)


def value_groups(d: int, group: int) -> tuple[int, int]:
    """``(channels per group, groups)`` of a per-token value quantizer: ``group`` channels (the whole head when it
    has fewer), the last group shorter when ``group`` does not divide ``d``."""
    size = min(group, d)
    return size, -(-d // size)


def _grouped_channels(x: torch.Tensor, size: int, count: int) -> torch.Tensor:
    """``[..., d]`` -> ``[..., count, size]``; a ragged last group is padded with copies of the last channel, which
    leave its min and max unchanged."""
    d = x.shape[-1]
    if count * size != d:
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], count * size - d)], dim=-1)
    return x.view(*x.shape[:-1], count, size)


def quantize_keys(keys: torch.Tensor, bits: int, dtype: torch.dtype, live: torch.Tensor | None = None):
    """Keys ``[..., G, d]`` (one group of ``G`` tokens) quantized per channel: packed codes ``[..., G, d*b/8]`` and
    ``scale``/``zero`` ``[..., d]``. ``live`` ``[..., G]``: tokens that set the range (others are still coded)."""
    mask = None if live is None else live[..., None]
    scale, zero = minmax(keys, -2, bits, dtype, mask)
    codes = quantize(keys, scale[..., None, :], zero[..., None, :], bits)
    return pack(codes, bits), scale, zero


def dequantize_keys(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, dtype: torch.dtype):
    """Packed key codes ``[..., d*b/8]`` with their group's per-channel ``scale``/``zero`` ``[..., d]``."""
    return dequantize(unpack(packed, bits, scale.shape[-1]), scale, zero, dtype)


def quantize_values(values: torch.Tensor, bits: int, group: int, dtype: torch.dtype):
    """Values ``[..., d]`` quantized per token in groups of ``group`` channels: packed codes ``[..., d*b/8]`` and
    ``scale``/``zero`` ``[..., groups]``."""
    d = values.shape[-1]
    size, count = value_groups(d, group)
    grouped = _grouped_channels(values, size, count)
    scale, zero = minmax(grouped, -1, bits, dtype)
    codes = quantize(grouped, scale[..., None], zero[..., None], bits).flatten(-2)[..., :d]
    return pack(codes, bits), scale, zero


def dequantize_values(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int, d: int, dtype: torch.dtype
) -> torch.Tensor:
    """Packed value codes ``[..., d*b/8]`` of ``d`` channels with per-token ``scale``/``zero`` ``[..., groups]``."""
    codes = unpack(packed, bits, d)
    size, count = value_groups(d, group)
    if size * count == d:
        grouped = codes.view(*codes.shape[:-1], count, size)
        return dequantize(grouped, scale[..., None], zero[..., None], dtype).flatten(-2)
    scale, zero = (t.repeat_interleave(size, dim=-1)[..., :d] for t in (scale, zero))  # one per channel
    return dequantize(codes, scale, zero, dtype)
