"""Mistral: without a sliding window (v0.3) and with one on every layer (v0.1, whose layers are then compressed
with their window applied): oracle cases for both, and the uncompressed logits at a large budget."""

from __future__ import annotations

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

import crushkv
from conftest import VOCAB, batch_inputs
from oracle import generate_recorded, generation_positions, oracle_logits, oracle_masks


def _mistral(sliding_window=None) -> MistralForCausalLM:
    torch.manual_seed(0)
    cfg = MistralConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=sliding_window,
        pad_token_id=0,
    )
    return MistralForCausalLM(cfg).eval()


@pytest.mark.parametrize("window", [None, 16], ids=["no-window", "sliding-window"])
@pytest.mark.parametrize("store", ["dense", "paged,page=4"])
def test_mistral_matches_oracle(window, store):
    model = _mistral(window)
    ids, mask = batch_inputs()
    spec = f"h2o+kvcrush:budget=12,crush=4,sink=2,recent=4,anchor=mean,store={store}"
    with crushkv.compress(model, spec) as cache:
        out, recorder = generate_recorded(model, cache, ids, mask, 8)
    sequence = out.sequences[:, :-1]
    full_mask = torch.cat([mask, torch.ones(2, sequence.shape[1] - ids.shape[1], dtype=mask.dtype)], dim=1)
    reference = oracle_logits(
        model, sequence, generation_positions(full_mask), oracle_masks(model, cache, recorder, mask, sequence.shape[1])
    )
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits, reference[:, ids.shape[1] - 1 + step], atol=2e-5, rtol=0)


def test_all_sliding_mistral_uncompressed_at_a_large_budget():
    """Every layer slides (window 10 < 24 prompt tokens + 8 new): the compressed layers apply the window themselves,
    drop what falls out of it, and reproduce transformers' own sliding-window logits."""
    model = _mistral(10)
    ids, mask = batch_inputs()
    kwargs = {"attention_mask": mask, "max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    kwargs.update(output_logits=True, return_dict_in_generate=True)
    reference = model.generate(ids, **kwargs)
    with crushkv.compress(model, "h2o:budget=64,sink=2,recent=4") as cache:
        result = model.generate(ids, **kwargs, **crushkv.cache_kwargs(model, cache))
    for got, want in zip(result.logits, reference.logits, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert max(cache.kept_tokens()) <= 10  # out-of-window tokens are freed
