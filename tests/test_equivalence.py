"""Proof 1: with a budget >= the sequence length, every policy gives exactly the uncompressed logits."""

from __future__ import annotations

import pytest
import torch

import crushkv
from conftest import batch_inputs
from policy_matrix import STORE_OPTIONS, all_specs

NEW_TOKENS = 20


def _generate(model, ids, mask, **kwargs):
    return model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
        **kwargs,
    )


@pytest.mark.parametrize("store", STORE_OPTIONS)
@pytest.mark.parametrize("spec", all_specs(budget=64))
def test_large_budget_matches_uncompressed(arch_model, spec, store):
    _, model = arch_model
    ids, mask = batch_inputs(batch=2, length=24, pad=5)
    reference = _generate(model, ids, mask)
    spec = f"{spec}{':' if spec == 'full' else ','}{STORE_OPTIONS[store]}"
    with crushkv.compress(model, spec) as cache:
        result = _generate(model, ids, mask, **crushkv.cache_kwargs(model, cache))
    assert torch.equal(result.sequences, reference.sequences)
    for got, want in zip(result.logits, reference.logits, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert cache.get_seq_length() == ids.shape[1] + NEW_TOKENS - 1
    for layer in cache.compressed_layers:
        assert cache.kept_positions(layer).shape[-1] == ids.shape[1] + NEW_TOKENS - 1


#: quantized slots whose residual holds the whole sequence (24 + 20 tokens): nothing is ever quantized
WHOLE_RESIDUAL = "quant=int4,group=4,residual=64"


@pytest.mark.parametrize("spec", all_specs(budget=64))
def test_quantized_store_with_a_residual_over_the_length_matches_uncompressed(arch_model, spec):
    """Budget >= length and residual >= length: the quantized store's logits are bit-identical to the unquantized
    dense store's (the same spec without ``quant=``), and equal the uncompressed cache's."""
    _, model = arch_model
    ids, mask = batch_inputs(batch=2, length=24, pad=5)
    reference = _generate(model, ids, mask)
    results = []
    for extra in ("store=dense", WHOLE_RESIDUAL):
        with crushkv.compress(model, f"{spec}{':' if spec == 'full' else ','}{extra}") as cache:
            results.append(_generate(model, ids, mask, **crushkv.cache_kwargs(model, cache)))
    dense, quantized = results
    assert torch.equal(quantized.sequences, reference.sequences)
    for got, plain, want in zip(quantized.logits, dense.logits, reference.logits, strict=True):
        assert torch.equal(got, plain)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_ratio_budget_of_one_keeps_everything(arch_model):
    """A ratio is resolved against the prompt; with phase=prefill a ratio of 1.0 never evicts."""
    _, model = arch_model
    ids, mask = batch_inputs()
    reference = _generate(model, ids, mask)
    with crushkv.compress(model, "h2o+kvcrush:budget=1.0,crush=0.25,sink=2,recent=4,phase=prefill") as cache:
        result = _generate(model, ids, mask, **crushkv.cache_kwargs(model, cache))
    for got, want in zip(result.logits, reference.logits, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_context_restores_attention_implementation(arch_model):
    _, model = arch_model
    before = model.config._attn_implementation
    with crushkv.compress(model, "h2o:budget=16,sink=2,recent=4"):
        assert model.config._attn_implementation == "crushkv"
    assert model.config._attn_implementation == before
    assert not any(hasattr(m, "_crushkv_cache") for m in model.modules())
