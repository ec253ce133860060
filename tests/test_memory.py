"""Proof 5: eviction frees real storage, within each store's stated bound, at every step.

* ``store=dense``: one ``[B, H, capacity, d]`` buffer per layer; right after a cut ``capacity = kept + reserve``
  (``reserve``: the interval for decode-phase policies, one growth step ``max(16, kept // 32)`` for prefill-phase
  ones), growing by that step when appends need it. So held bytes <= kept/total of the full cache x 1.02 for a
  decode-phase policy at ``interval=1`` (budget >= 50), and <= kept + one growth step for a prefill-phase one.
* ``store=paged``: each (batch row, KV head) holds ``ceil(slots in use / page)`` pages, and its holes never exceed
  ``reserve + page`` (compaction), so pages <= ceil((kept + reserve + page) / page) per row; pages freed by one
  row or layer are reused by the others before the pool grows.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import crushkv
from conftest import batch_inputs
from crushkv.layer import CompressedLayer
from crushkv.stores import BlockPool, DenseStore, PagedStore, grown

PROMPT = 200
BUDGET = 64


def _slot_bytes(layer: CompressedLayer) -> int:
    return (layer.key_dim + layer.value_dim) * layer.dtype.itemsize


def _check_layers(cache, seen: int) -> None:
    """Every compressed layer's real storage against its store's bound."""
    policy = cache.policy
    for layer in cache.layers:
        if not isinstance(layer, CompressedLayer):
            continue
        b, h = layer.valid.shape[:2]
        counts = layer.counts()
        kept = int(counts.max())
        reserve = layer.reserve_after_cut((BUDGET,))
        store = layer.store
        if isinstance(store, DenseStore):
            held = store.keys.untyped_storage().nbytes() + store.values.untyped_storage().nbytes()
            assert held == store.nbytes() == b * h * store.capacity * _slot_bytes(layer), "storage not compact"
            full = b * h * seen * _slot_bytes(layer)
            if policy.phase == "decode":
                assert store.capacity <= kept + reserve
                assert held <= kept / seen * full * 1.02
            else:
                assert store.capacity <= kept + grown(kept) - kept + reserve
        else:
            page = store.page
            bound = ((counts + reserve + page + page - 1) // page).sum()
            assert store.pages <= int(bound)
            assert store.pages == int((store.table != 0).sum())
            assert store.nbytes() == store.pages * store.pool.page_nbytes + store.table.numel() * 8


SPECS = [
    f"snapkv:budget={BUDGET},window=8",
    f"h2o+kvcrush:budget={BUDGET},crush=16,recent=8",
    f"h2o+adakv:budget={BUDGET},recent=8",
]


@pytest.mark.parametrize("store", ["dense", "paged,page=8"])
@pytest.mark.parametrize("spec", SPECS)
def test_storage_within_the_stated_bound_at_every_step(arch_model, spec, store):
    _, model = arch_model
    ids = torch.randint(1, 90, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), crushkv.compress(model, f"{spec},store={store}") as cache:
        out = model(ids, **crushkv.cache_kwargs(model, cache))
        _check_layers(cache, PROMPT)
        for i in cache.compressed_layers:  # every (batch row, head) at the budget, or per-head counts summing to it
            counts = cache.kept_counts(i)
            assert int(counts.sum()) == counts.shape[1] * BUDGET
            assert "adakv" in spec or {int(c) for c in counts.flatten()} == {BUDGET}
        token = out.logits[:, -1:].argmax(-1)
        for step in range(1, 12):
            out = model(token, **crushkv.cache_kwargs(model, cache))
            token = out.logits[:, -1:].argmax(-1)
            _check_layers(cache, PROMPT + step)
        assert cache.nbytes() < 0.5 * cache.full_nbytes()


def test_paged_bytes_follow_each_heads_own_count(arch_model):
    """Per-head budgets: the paged store holds the sum of the heads' counts (page-rounded), not the largest head."""
    _, model = arch_model
    ids, mask = batch_inputs(batch=2, length=PROMPT, pad=30)
    spec = f"snapkv+adakv:budget={BUDGET},window=8,floor=0.1,store=paged,page=4"
    with torch.no_grad(), crushkv.compress(model, spec) as cache:
        model(ids, attention_mask=mask, **crushkv.cache_kwargs(model, cache))
        for i in cache.compressed_layers:
            layer = cache.layers[i]
            counts = layer.counts()
            assert int(layer.store.pages) == int(((counts + 3) // 4).sum())  # compacted after the prompt cut
        ragged = [cache.kept_counts(i) for i in cache.compressed_layers]
        if all(c.shape[1] > 1 for c in ragged):
            assert any(len(set(c[1].tolist())) > 1 for c in ragged), "Ada-KV gave every head the same count"


def test_pool_pages_freed_by_one_row_are_reused_by_another():
    """Row 0 is cut hard, both rows grow: row 1's new pages are row 0's old ones, and the pool does not grow."""
    pool = BlockPool(page=4, key_dim=8, value_dim=8, dtype=torch.float32, device=torch.device("cpu"))
    store = PagedStore(pool)
    prompt = torch.randn(2, 1, 32, 8)
    store.adopt(prompt, prompt)  # 8 pages per row
    assert store.pages == 16 and pool.in_use == 16
    before = store.table.clone()
    store.fit(torch.tensor([[4], [32]]), reserve=0)  # row 0 keeps one page
    freed = set(before[0, 1:].tolist())
    assert store.pages == 9 and pool.in_use == 9 and set(pool.free) >= freed
    capacity = pool.capacity
    store.reserve(44)
    new = torch.randn(2, 1, 12, 8)
    slots = torch.stack([torch.arange(4, 16), torch.arange(32, 44)])[:, None]
    store.write(slots, new, new)  # each row takes 3 more pages
    assert store.pages == 15 and pool.capacity == capacity, "the pool grew although freed pages were available"
    assert freed & set(store.table[1].tolist()), "row 1 did not reuse a page row 0 gave back"
    keys, _ = store.dense(44)
    torch.testing.assert_close(keys[1, 0, 32:44], new[1, 0])
    torch.testing.assert_close(keys[0, 0, 4:16], new[0, 0])
    torch.testing.assert_close(keys[0, 0, :4], prompt[0, 0, :4])
    torch.testing.assert_close(keys[1, 0, :32], prompt[1, 0])


def test_paged_pool_is_shared_by_the_layers_and_reused_in_decoding(arch_model):
    """One pool per cache; after the prompt cut, decoding takes pages from the free list before growing the pool."""
    _, model = arch_model
    ids = torch.randint(1, 90, (1, PROMPT), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), crushkv.compress(model, f"snapkv:budget={BUDGET},window=8,store=paged,page=4") as cache:
        out = model(ids, **crushkv.cache_kwargs(model, cache))
        (pool,) = cache.pools.values()
        capacity, in_use = pool.capacity, pool.in_use
        assert capacity > in_use  # the prompt's pages came back to the pool
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(24):
            out = model(token, **crushkv.cache_kwargs(model, cache))
            token = out.logits[:, -1:].argmax(-1)
        assert pool.in_use > in_use and pool.capacity == capacity
        assert cache.reserved_nbytes() >= cache.nbytes()


def test_full_nbytes_matches_a_dynamic_cache(arch_model):
    _, model = arch_model
    ids = torch.randint(1, 90, (2, 40), generator=torch.Generator().manual_seed(1))
    reference = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **crushkv.cache_kwargs(model, reference))
        with crushkv.compress(model, "full") as cache:
            model(ids, **crushkv.cache_kwargs(model, cache))
    logical = sum((layer.keys.numel() + layer.values.numel()) * layer.keys.element_size() for layer in reference.layers)
    storage = sum(
        layer.keys.untyped_storage().nbytes() + layer.values.untyped_storage().nbytes() for layer in reference.layers
    )
    assert cache.full_nbytes() == logical == cache.logical_nbytes()
    # real storage: the same as transformers' own cache (whose sliding layers keep a view of the whole prompt)
    assert cache.nbytes() == storage


def test_mask_sizes_accept_count_or_cache_position(arch_model):
    """transformers < 5.3 passes ``cache_position`` to ``get_mask_sizes``; later versions pass the query length.
    crushkv builds its own masks over the slots, so transformers' mask only covers the new tokens."""
    _, model = arch_model
    ids = torch.randint(1, 90, (1, PROMPT), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), crushkv.compress(model, f"snapkv:budget={BUDGET},window=8") as cache:
        model(ids, **crushkv.cache_kwargs(model, cache))
        for i in cache.compressed_layers:
            layer = cache.layers[i]
            assert layer.get_mask_sizes(torch.arange(PROMPT, PROMPT + 3)) == layer.get_mask_sizes(3)
            assert layer.get_mask_sizes(3) == (3, PROMPT)


QUANT = "quant=int4,group=16,residual=32"


def _quant_formula(layer: CompressedLayer) -> int:
    """Bytes a quantized layer should hold, from what it keeps (not from the store's own counters): per (batch row,
    KV head) packed codes and value ranges for every slot, a key range per group of ``group`` positions some held
    quantized token belongs to, and a residual FIFO of ``residual + group`` full-precision tokens."""
    store = layer.store
    b, h = layer.valid.shape[:2]
    s = layer.dtype.itemsize
    bits, group, residual = store.bits, store.group, store.residual
    dk, dv = layer.key_dim, layer.value_dim
    per_slot = -(-dk * bits // 8) + -(-dv * bits // 8) + 2 * -(-dv // min(group, dv)) * s + 2  # + int16 ``where``
    quantized_below = max(0, layer.seen - residual) // group * group  # positions older than the residual window
    held = layer.positions[layer.valid & (layer.positions < quantized_below)]
    groups = int(torch.unique(held // group).numel())
    fifo = (residual + group) * ((dk + dv) * s + 8)  # + the int64 owner slot of each entry
    return b * h * (store.capacity * per_slot + groups * 2 * dk * s + fifo)


@pytest.mark.parametrize("spec", ["full", *SPECS])
def test_quantized_storage_equals_the_formula_at_every_step(arch_model, spec):
    """Packed bits + scales/zeros + residual: the real bytes equal the formula within 2 % after the prompt and at
    every decode step, with and without eviction (groups whose tokens are all evicted are given back)."""
    _, model = arch_model
    ids, mask = batch_inputs(batch=2, length=PROMPT, pad=7)
    spec = f"full:{QUANT}" if spec == "full" else f"{spec},{QUANT}"

    def check():
        for i in cache.compressed_layers:
            layer = cache.layers[i]
            real = layer.store.nbytes()
            assert real == sum(t.untyped_storage().nbytes() for t in vars(layer.store).values() if torch.is_tensor(t))
            assert abs(real - _quant_formula(layer)) <= 0.02 * _quant_formula(layer), (real, _quant_formula(layer))
            if cache.policy.compresses and cache.policy.phase == "decode":  # slots: the dense store's bound
                assert layer.store.capacity <= int(layer.counts().max()) + layer.reserve_after_cut((BUDGET,))

    with torch.no_grad(), crushkv.compress(model, spec) as cache:
        out = model(ids, attention_mask=mask, **crushkv.cache_kwargs(model, cache))
        check()
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(40):  # past two more key groups
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            out = model(token, attention_mask=mask, **crushkv.cache_kwargs(model, cache))
            token = out.logits[:, -1:].argmax(-1)
            check()


def _tier_bytes(layer: CompressedLayer, counts: torch.Tensor) -> int:
    """Bytes of a low-precision tier holding ``counts`` ``[B, H]`` tokens: every token's packed key and value codes
    and its values' scale and zero per group of channels; per completed group of ``group`` tokens one key scale and
    zero per channel; the open (incomplete) group's keys at full precision."""
    tier, item, dk, dv = layer.tier, layer.dtype.itemsize, layer.key_dim, layer.value_dim
    per_token = -(-dk * tier.bits // 8) + -(-dv * tier.bits // 8) + 2 * -(-dv // min(tier.group, dv)) * item
    tokens, full = int(counts.sum()), int((counts // tier.group).sum())
    return tokens * per_token + full * 2 * dk * item + (tokens - full * tier.group) * dk * item


@pytest.mark.parametrize("spec", [f"{s},tier=int2,group=16" for s in SPECS] + [f"{SPECS[1]},phase=prefill,tier=int4"])
def test_the_tier_holds_every_evicted_token_at_its_formula(arch_model, spec):
    """No token left behind: after every step each row's full-precision slots and tier together hold every real
    token it has seen; the tier's bytes are the formula (codes, ranges, open-group keys) of the tokens held, its
    storage that of a capacity at most one growth step (rounded to whole key groups) above the fullest row."""
    _, model = arch_model
    ids, mask = batch_inputs(batch=2, length=PROMPT, pad=7)

    def check():
        real = mask.sum(-1)  # real tokens per batch row
        for i in cache.compressed_layers:
            layer = cache.layers[i]
            tier_counts = layer.tier.counts if layer.tier.counts is not None else 0
            held = layer.counts() + tier_counts
            assert torch.equal(held, real[:, None].expand_as(held)), (held, real)
            tier, (b, h) = layer.tier, held.shape
            assert tier.logical_nbytes() == _tier_bytes(layer, tier.counts)
            # storage: the formula for every slot of the capacity, whose groups are all counted as completed, plus
            # the open-group buffer (one group of exact keys per row)
            slots = torch.full_like(tier.counts, tier.capacity)
            open_buffer = b * h * tier.group * layer.key_dim * layer.dtype.itemsize
            assert tier.nbytes() == _tier_bytes(layer, slots) + open_buffer
            group = tier.group
            assert tier.capacity <= -(-grown(int(tier.counts.max())) // group) * group

    with torch.no_grad(), crushkv.compress(model, spec) as cache:
        out = model(ids, attention_mask=mask, **crushkv.cache_kwargs(model, cache))
        check()
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(12):
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            out = model(token, attention_mask=mask, **crushkv.cache_kwargs(model, cache))
            token = out.logits[:, -1:].argmax(-1)
            check()
    assert cache.nbytes() < cache.full_nbytes()


@pytest.mark.parametrize(
    "spec",
    [
        "full",
        f"h2o:budget={BUDGET},recent=8",
        f"h2o:budget={BUDGET},recent=8,store=paged,page=8",
        "full:quant=int4,residual=32",
        f"snapkv:budget={BUDGET},window=8,quant=int2,residual=32",
        f"snapkv:budget={BUDGET},window=8,tier=int2",
    ],
)
def test_bytes_at_16_bits_are_what_a_16_bit_run_holds(spec):
    """``nbytes(float_bytes=2)`` of an fp32 run (how accuracy-per-byte points are reported) equals ``nbytes()`` of
    the same run in bfloat16: floats at 2 bytes, codes and tables as they are."""
    from conftest import tiny_llama

    torch.manual_seed(0)
    fp32 = tiny_llama().eval()
    bf16 = tiny_llama().eval().to(torch.bfloat16)
    bf16.load_state_dict({k: v.to(torch.bfloat16) for k, v in fp32.state_dict().items()})
    ids = torch.randint(1, 90, (2, PROMPT), generator=torch.Generator().manual_seed(0))
    held = []
    for model in (fp32, bf16):
        with torch.no_grad(), crushkv.compress(model, spec) as cache:
            out = model(ids, **crushkv.cache_kwargs(model, cache))
            for _ in range(5):
                out = model(out.logits[:, -1:].argmax(-1), **crushkv.cache_kwargs(model, cache))
            held.append((cache.nbytes(), cache.nbytes(float_bytes=2)))
    (fp32_bytes, fp32_at_16), (bf16_bytes, bf16_at_16) = held
    assert fp32_at_16 == bf16_bytes == bf16_at_16
    assert fp32_bytes > fp32_at_16


def test_low_precision_representatives_hold_the_crush_share_in_the_tier(arch_model):
    """``reps=int4``: after the prompt's cut each row keeps ``budget - crush`` host tokens in its store and exactly
    the ``crush`` representatives KVCrush picks in the tier (the same picks as ``reps=full``), which hold them in
    fewer bytes than full precision (32 representatives: one whole key group; a group's keys are exact until it
    fills)."""
    _, model = arch_model
    ids, mask = batch_inputs(batch=2, length=PROMPT, pad=30)
    base = f"snapkv+kvcrush:budget={BUDGET},window=8,crush=32,anchor=mean,phase=prefill"
    held = {}
    for reps in ("full", "int4"):
        with torch.no_grad(), crushkv.compress(model, f"{base},reps={reps}") as cache:
            model(ids, attention_mask=mask, **crushkv.cache_kwargs(model, cache))
            kept = {i: cache.kept_positions(i) for i in cache.compressed_layers}
            tier = {i: cache.tier_positions(i) for i in cache.compressed_layers}
            held[reps] = (kept, tier)
            for i in cache.compressed_layers:
                assert (cache.kept_counts(i) == BUDGET - (32 if reps == "int4" else 0)).all()
                layer = cache.layers[i]
                if reps == "int4":  # the representatives cost less in the tier than at full precision
                    b, h = layer.tier.counts.shape
                    exact = b * h * 32 * (layer.key_dim + layer.value_dim) * layer.dtype.itemsize
                    assert layer.tier.logical_nbytes() < exact
    kept_full, _ = held["full"]
    kept_low, tier_low = held["int4"]
    for i, positions in kept_full.items():
        assert (tier_low[i] >= 0).sum(-1).eq(32).all(), "every row demoted its 32 representatives"
        for row in range(2):
            for head in range(positions.shape[1]):
                both = set(kept_low[i][row, head].tolist()) | set(tier_low[i][row, head].tolist())
                assert both - {-1} == set(positions[row, head].tolist()) - {-1}
