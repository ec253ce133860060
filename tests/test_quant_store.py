"""``QuantStore`` on its own: what it reads back, and that eviction, rewrites and compaction never change a kept
token's quantized value."""

from __future__ import annotations

import pytest
import torch

from crushkv import quant
from crushkv.stores import QuantScratch, QuantStore
from crushkv.stores.quant import EMPTY

B, H, DK, DV = 2, 2, 16, 12  # DV: value groups of 8 channels leave a ragged group of 4


def _store(bits=4, group=4, residual=6) -> QuantStore:
    return QuantStore(bits, group, residual, QuantScratch())


def _tokens(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, n, DK, generator=gen), torch.randn(B, H, n, DV, generator=gen)


def _reference(keys, values, bits, group, quantized: int):
    """What the store must read back after holding ``keys``/``values`` in slots = positions: the first ``quantized``
    positions quantized (keys per channel over each ``group`` positions, values per token), the rest exact."""
    want_k, want_v = keys.clone(), values.clone()
    for g0 in range(0, quantized, group):
        block = keys[:, :, g0 : g0 + group]
        packed, scale, zero = quant.quantize_keys(block, bits, keys.dtype)
        back = quant.dequantize_keys(packed, scale[:, :, None], zero[:, :, None], bits, keys.dtype)
        want_k[:, :, g0 : g0 + group] = back
    packed, scale, zero = quant.quantize_values(values[:, :, :quantized], bits, group, values.dtype)
    want_v[:, :, :quantized] = quant.dequantize_values(packed, scale, zero, bits, group, DV, values.dtype)
    return want_k, want_v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_prompt_and_appends_read_back_as_kivi(bits, dtype):
    """Prompt of 17 with residual 6, group 4: 8 positions quantized at once, 9 at full precision. Appends quantize
    the oldest group whenever residual + group = 10 tokens are at full precision: after 5, positions 8..15 are
    quantized (two groups, one at a time) and the newest 6 are exact."""
    store = _store(bits)
    keys, values = (t.to(dtype) for t in _tokens(22))
    store.adopt(keys[:, :, :17], values[:, :, :17])
    want_k, want_v = _reference(keys[:, :, :17], values[:, :, :17], bits, 4, 8)
    got_k, got_v = store.dense(17)
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
    store.reserve(22)
    for t in range(17, 22):
        store.write(torch.full((B, H, 1), t), keys[:, :, t : t + 1], values[:, :, t : t + 1])
    want_k, want_v = _reference(keys, values, bits, 4, 16)
    got_k, got_v = store.dense(22)
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
    assert store.count == 6 and store.key_scale.shape[2] == 4
    assert torch.equal(got_k[:, :, 16:], keys[:, :, 16:]) and not torch.equal(got_k[:, :, 15], keys[:, :, 15])


def test_eviction_inside_a_group_keeps_the_neighbours_exact():
    """Evict slots inside a quantized group, rewrite one of them with a new token, compact another group's last
    token into a hole: every kept token reads back bit-identically, and the new token is exact (full precision)."""
    store = _store()
    keys, values = _tokens(20, seed=1)
    store.adopt(keys[:, :, :16], values[:, :, :16])  # groups 0..3 hold positions 0..7 (residual 6 + 2)
    before_k, before_v = store.dense(16)
    freed = torch.zeros(B, H, 16, dtype=torch.bool)
    freed[0, 0, [1, 2]] = True  # inside group 0
    freed[1, 1, 5] = True  # inside group 1
    store.evicted(freed)
    store.reserve(17)
    slot = torch.tensor([1, 3, 4, 16]).view(B, H, 1)  # row (0, 0) reuses its freed slot 1
    store.write(slot, keys[:, :, 16:17], values[:, :, 16:17])
    after_k, after_v = store.dense(17)
    kept = ~freed
    kept[0, 0, 1] = False
    kept[0, 1, 3] = kept[1, 0, 4] = False  # rewritten (those rows' tokens there were replaced)
    assert torch.equal(after_k[:, :, :16][kept], before_k[kept])
    assert torch.equal(after_v[:, :, :16][kept], before_v[kept])
    assert torch.equal(after_k[0, 0, 1], keys[0, 0, 16]) and torch.equal(after_v[0, 0, 1], values[0, 0, 16])
    # compaction of row (1, 1): its slot 9 (a full-precision token) and slot 3 (quantized) move into holes
    rows, src, dst = torch.tensor([3, 3]), torch.tensor([9, 3]), torch.tensor([5, 2])
    moved_k, moved_v = after_k[1, 1, src].clone(), after_v[1, 1, src].clone()
    store.move(rows, src, dst)
    final_k, final_v = store.dense(17)
    assert torch.equal(final_k[1, 1, dst], moved_k) and torch.equal(final_v[1, 1, dst], moved_v)
    # the moved full-precision token is quantized later from its new slot, with its group
    store.reserve(24)
    for t in range(17, 24):
        store.write(torch.full((B, H, 1), t), keys[:, :, t % 20 : t % 20 + 1], values[:, :, t % 20 : t % 20 + 1])
    assert int(store.where[1, 1, 5]) >= 0, "the moved residual token was quantized in its new slot"
    assert int(store.where[1, 1, 9]) == EMPTY, "its old slot holds nothing"


def test_groups_nobody_uses_are_given_back():
    store = _store(group=4, residual=4)
    keys, values = _tokens(16, seed=2)
    store.adopt(keys, values)  # groups 0..2 (positions 0..11), residual 12..15
    assert store.key_scale.shape[2] == 3
    freed = torch.zeros(B, H, 16, dtype=torch.bool)
    freed[..., 4:8] = True  # group 1 in every row
    store.evicted(freed)
    before_k, _ = store.dense(16)
    store.fit(torch.full((B, H), 16), reserve=1)
    assert store.key_scale.shape[2] == 2
    after_k, _ = store.dense(16)
    assert torch.equal(after_k[~freed], before_k[~freed])
    freed[..., 0] = True  # a group with one token gone in every row keeps its range for the others
    store.evicted(freed)
    store.fit(torch.full((B, H), 16), reserve=1)
    assert store.key_scale.shape[2] == 2


def test_int4_and_int2_bytes_against_bf16():
    """SmolLM2-like shapes: d = 64, bf16, group 32, residual 128, 2048 tokens: packed codes, ranges and residual
    against the bf16 K/V of the same tokens."""
    store = QuantStore(4, 32, 128, QuantScratch())
    keys = torch.randn(1, 3, 2048, 64).to(torch.bfloat16)
    store.adopt(keys, keys)
    full = 2 * keys.numel() * keys.element_size()
    ratio = store.nbytes() / full
    # per slot: 64 B codes + 8 B value ranges + 2 B where = 74 B, 256 B of key ranges per 32 quantized tokens (60
    # groups), and the FIFO's 160 full-precision entries of 256 + 8 B: 0.399 of the 524 288 bf16 bytes
    want = (2048 * 74 + 60 * 256 + 160 * 264) * 3
    assert store.nbytes() == want and 0.39 < ratio < 0.40, ratio
    two = QuantStore(2, 32, 128, QuantScratch())
    two.adopt(keys, keys)
    assert two.nbytes() == (2048 * 42 + 60 * 256 + 160 * 264) * 3  # 16 + 16 B of codes per slot: 0.274


def test_dense_copies_and_scratch_is_shared():
    """``dense(n)`` is a copy the caller may keep; ``scratch=True`` reads the buffer the cache's layers share."""
    scratch = QuantScratch()
    a, b = QuantStore(4, 4, 6, scratch), QuantStore(4, 4, 6, scratch)
    keys, values = _tokens(12, seed=3)
    a.adopt(keys, values)
    b.adopt(keys + 1, values + 1)
    kept, _ = a.dense(12)
    view_a, _ = a.dense(12, scratch=True)
    view_b, _ = b.dense(12, scratch=True)
    assert view_a.data_ptr() == view_b.data_ptr()
    assert torch.equal(view_b, b.dense(12)[0]) and not torch.equal(kept, view_b)
    assert torch.equal(a.dense(12, scratch=True)[0], kept)  # re-dequantized once another layer used the buffer
