"""Proof 2: after eviction, logits equal a full-cache forward that masks out exactly the evicted entries."""

from __future__ import annotations

import pytest
import torch

import crushkv
from conftest import batch_inputs
from crushkv.policies import REGISTRY
from crushkv.stores import STORES
from oracle import (
    generate_recorded,
    generation_positions,
    oracle_logits,
    oracle_masks,
    record_store_kv,
    stored_by_position,
)
from policy_matrix import QUANT_OPTIONS, STORE_OPTIONS, TIER_OPTIONS, all_specs, small_spec

NEW_TOKENS = 12
BUDGET = 12


def _check_against_oracle(model, spec: str, **generate_kwargs) -> None:
    ids, mask = batch_inputs(batch=2, length=24, pad=5)
    with crushkv.compress(model, spec) as cache, record_store_kv() as records:
        out, recorder = generate_recorded(model, cache, ids, mask, NEW_TOKENS, **generate_kwargs)
    sequence = out.sequences[:, :-1]
    total = sequence.shape[1]
    full_mask = torch.cat([mask, torch.ones(mask.shape[0], total - mask.shape[1], dtype=mask.dtype)], dim=1)
    masks = oracle_masks(model, cache, recorder, mask, total)
    stored = stored_by_position(records, total)
    quantized = any(key in spec for key in ("quant=", "tier=", "reps="))
    assert bool(stored) == quantized, "quantized layers (only those) hand their stored K/V to the oracle"
    reference = oracle_logits(model, sequence, generation_positions(full_mask), masks, stored)
    prompt = ids.shape[1]
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits, reference[:, prompt - 1 + step], atol=2e-5, rtol=0)
    if cache.policy.compresses:
        # eviction really happened: every compressed layer ended below the sequence length
        assert all(len(h[i][0, 0]) < total for h in recorder.history[-1:] for i in h)


def _both_phases(**options) -> list[str]:
    """``all_specs`` in both phases (``full``, which has no phase, once)."""
    return [
        spec
        for phase in ("prefill", "decode")
        for spec in all_specs(budget=BUDGET, phase=phase, **options)
        if "phase=" in spec or phase == "prefill"
    ]


MATRIX = [spec for store in STORES for spec in _both_phases(store=store)]
#: the whole matrix again on quantized slots: logits equal the oracle attending over the store's dequantized K/V
QUANT_MATRIX = _both_phases(quant="int4")


@pytest.mark.parametrize("spec", MATRIX)
def test_eviction_matches_masked_oracle(arch_model, spec):
    _, model = arch_model
    _check_against_oracle(model, spec)


@pytest.mark.parametrize("spec", QUANT_MATRIX)
def test_quantized_eviction_matches_oracle_over_the_stored_kv(arch_model, spec):
    _, model = arch_model
    _check_against_oracle(model, spec)


#: the matrix once more with evicted tokens kept at 2 bits: they stay visible, over their dequantized K/V
TIER_MATRIX = _both_phases(tier="int2")


@pytest.mark.parametrize("spec", TIER_MATRIX)
def test_low_precision_tier_matches_oracle_over_the_stored_kv(arch_model, spec):
    _, model = arch_model
    _check_against_oracle(model, spec)


@pytest.mark.parametrize(
    "spec",
    [
        "h2o:budget=12,sink=2,recent=4,phase=decode,tier=int8",
        f"snapkv+kvcrush:budget=12,sink=2,recent=4,window=4,crush=4,{QUANT_OPTIONS['int4']},tier=int2",
        "h2o+adakv:budget=12,sink=2,recent=4,phase=decode,store=paged,page=4,tier=int4,group=8",
    ],
)
def test_tier_with_other_stores_and_bit_widths_matches_oracle(arch_model, spec):
    _, model = arch_model
    _check_against_oracle(model, spec)


#: KVCrush's representatives at low precision (``reps=``) on every host, the host's tokens at full precision
REPS_MATRIX = [
    f"{small_spec(name, BUDGET, 'prefill', 'kvcrush', extra)},crush=4,anchor=mean,reps={reps}"
    for name in sorted(REGISTRY)
    if REGISTRY[name].compresses
    for extra, reps in ((None, "int4"), (STORE_OPTIONS["paged"], "int2"))
] + [f"{small_spec('h2o', BUDGET, 'prefill', 'floor=0.2,crush=4,anchor=mean')},reps=int8"]


@pytest.mark.parametrize("spec", REPS_MATRIX)
def test_low_precision_representatives_match_oracle_over_the_stored_kv(arch_model, spec):
    _, model = arch_model
    _check_against_oracle(model, spec)


def test_oracle_detects_the_tier(arch_model):
    """Not vacuous: the tier's tokens change the logits (an oracle that drops them, as without a tier, differs)."""
    _, model = arch_model
    ids, mask = batch_inputs(batch=2, length=24, pad=5)
    spec = f"snapkv:budget={BUDGET},sink=2,recent=4,window=4,{TIER_OPTIONS['int8']}"
    with crushkv.compress(model, spec) as cache:
        out, recorder = generate_recorded(model, cache, ids, mask, NEW_TOKENS)
    assert any(t.numel() for t in recorder.tiers[-1].values()), "the cut demoted tokens into the tier"
    total = out.sequences.shape[1] - 1
    full_mask = torch.cat([mask, torch.ones(2, total - 24, dtype=mask.dtype)], dim=1)
    recorder.tiers = [{i: torch.zeros(0, 0, 0, dtype=torch.long) for i in step} for step in recorder.tiers]
    masks = oracle_masks(model, cache, recorder, mask, total)
    reference = oracle_logits(model, out.sequences[:, :-1], generation_positions(full_mask), masks)
    assert not torch.allclose(out.logits[-1], reference[:, -1], atol=1e-3)


@pytest.mark.parametrize(
    "spec",
    [
        f"full:{QUANT_OPTIONS['int2']}",
        f"snapkv+kvcrush:budget=12,sink=2,recent=4,window=4,crush=4,{QUANT_OPTIONS['int2']}",
        "h2o+adakv:budget=12,sink=2,recent=4,quant=int8,group=8,residual=0",
        "tova:budget=10,recent=2,interval=3,quant=int4,group=4,residual=4",
    ],
)
def test_other_bit_widths_and_residuals_match_oracle(arch_model, spec):
    _, model = arch_model
    _check_against_oracle(model, spec)


def test_oracle_detects_quantization(arch_model):
    """Not vacuous: the same quantized run against the oracle over the model's own (unquantized) K/V differs."""
    _, model = arch_model
    ids, mask = batch_inputs(batch=2, length=24, pad=5)
    with crushkv.compress(model, f"full:{QUANT_OPTIONS['int2']}") as cache:
        out, recorder = generate_recorded(model, cache, ids, mask, NEW_TOKENS)
    total = out.sequences.shape[1] - 1
    full_mask = torch.cat([mask, torch.ones(2, total - 24, dtype=mask.dtype)], dim=1)
    masks = oracle_masks(model, cache, recorder, mask, total)
    reference = oracle_logits(model, out.sequences[:, :-1], generation_positions(full_mask), masks)
    assert not torch.allclose(out.logits[-1], reference[:, -1], atol=1e-3)


@pytest.mark.parametrize("spec", [s for s in all_specs(budget=BUDGET, phase="decode") if s != "full"])
def test_every_store_keeps_the_same_tokens(arch_model, spec):
    """The stores only hold bytes: the same policy keeps the same positions at every step, whatever the store."""
    _, model = arch_model
    ids, mask = batch_inputs(batch=2, length=24, pad=5)
    runs = {}
    for store, option in STORE_OPTIONS.items():
        with crushkv.compress(model, f"{spec},{option}") as cache:
            out, recorder = generate_recorded(model, cache, ids, mask, NEW_TOKENS)
        runs[store] = (out, recorder.history)
    (out_a, kept_a), (out_b, kept_b) = runs.values()
    assert torch.equal(out_a.sequences, out_b.sequences)
    for a, b in zip(out_a.logits, out_b.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for step_a, step_b in zip(kept_a, kept_b, strict=True):
        assert all(torch.equal(step_a[i], step_b[i]) for i in step_a)


def test_padded_rows_resolve_a_ratio_budget_against_their_own_prompt(arch_model):
    """Batch rows keep ``ratio x their own prompt``, exactly what each row keeps alone (batch size 1)."""
    _, model = arch_model
    ids, mask = batch_inputs(batch=2, length=24, pad=6)  # row 0: 18 real tokens, row 1: 24
    spec = "h2o+kvcrush:budget=0.5,crush=0.25,sink=2,recent=4,anchor=mean,phase=prefill"
    with crushkv.compress(model, spec) as cache:
        out, recorder = generate_recorded(model, cache, ids, mask, 4)
    for i in cache.compressed_layers:
        counts = cache.kept_counts(i)
        assert counts[0].tolist() == [9 + 3] * counts.shape[1] and counts[1].tolist() == [12 + 3] * counts.shape[1]
    for row in range(2):
        real = mask[row].bool()
        alone_ids, alone_mask = ids[row : row + 1, real], mask[row : row + 1, real]
        with crushkv.compress(model, spec) as alone:
            single, single_rec = generate_recorded(model, alone, alone_ids, alone_mask, 4)
        pad = int((~real).sum())
        for step, (batched, one) in enumerate(zip(recorder.history, single_rec.history, strict=True)):
            for i in one:
                got = batched[i][row]
                got = got[got >= 0] - pad  # the batched row's positions count its padding
                assert torch.equal(got.view(-1, one[i].shape[-1]), one[i][0]), (row, step, i)
        torch.testing.assert_close(out.logits[-1][row], single.logits[-1][0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("spec", ["h2o+kvcrush:budget=12,crush=4,sink=2,recent=4", "snapkv:budget=0.5,window=4,sink=2"])
def test_sampling_matches_oracle(arch_model, spec):
    _, model = arch_model
    torch.manual_seed(1)
    _check_against_oracle(model, spec, do_sample=True, top_k=20)


def test_oracle_detects_a_wrong_mask(arch_model):
    """The oracle is not vacuous: dropping one more kept entry changes the logits."""
    _, model = arch_model
    ids, mask = batch_inputs(batch=2, length=24, pad=5)
    with crushkv.compress(model, "h2o:budget=12,sink=2,recent=4") as cache:
        out, recorder = generate_recorded(model, cache, ids, mask, NEW_TOKENS)
    sequence = out.sequences[:, :-1]
    total = sequence.shape[1]
    full_mask = torch.cat([mask, torch.ones(2, total - 24, dtype=mask.dtype)], dim=1)
    masks = oracle_masks(model, cache, recorder, mask, total)
    layer = cache.compressed_layers[-1]
    row = total - 1
    kept = recorder.history[-2][layer][1, 0]
    masks[layer][1, 0, row, kept[len(kept) // 2]] = False  # hide one kept token from the last query
    reference = oracle_logits(model, sequence, generation_positions(full_mask), masks)
    assert not torch.allclose(out.logits[-1][1], reference[1, row], atol=1e-4)


@pytest.mark.parametrize(
    "spec", ["h2o+kvcrush:budget=12,crush=4,sink=2,recent=4,interval=3", "tova:budget=10,recent=2,interval=4"]
)
def test_interval_eviction_matches_oracle(arch_model, spec):
    _, model = arch_model
    _check_against_oracle(model, spec)


def test_interval_auto_bounds_the_cache_by_a_64th_of_the_budget(arch_model):
    _, model = arch_model
    ids, mask = batch_inputs(batch=2, length=150, pad=5)
    with crushkv.compress(model, "h2o+kvcrush:budget=128,crush=32,sink=2,recent=4,interval=auto") as cache:
        _, recorder = generate_recorded(model, cache, ids, mask, 8)
    sizes = [h[i].shape[-1] for h in recorder.history for i in h]
    assert min(sizes) == 128 and max(sizes) == 128 + 3 - 1  # interval 1 + 128 // 64 = 3


def test_interval_bounds_the_cache(arch_model):
    _, model = arch_model
    ids, mask = batch_inputs(batch=2, length=24, pad=5)
    with crushkv.compress(model, "h2o:budget=12,sink=2,recent=4,interval=4") as cache:
        _, recorder = generate_recorded(model, cache, ids, mask, NEW_TOKENS)
    sizes = [h[i].shape[-1] for h in recorder.history for i in h]
    assert min(sizes) == 12 and max(sizes) == 12 + 4 - 1
