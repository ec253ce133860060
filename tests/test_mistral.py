"""Mistral (no sliding window, as in v0.3): one equivalence and one oracle case; the all-sliding v0.1 layout is
rejected with a clear error."""

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


def test_mistral_matches_oracle():
    model = _mistral()
    ids, mask = batch_inputs()
    with crushkv.compress(model, "h2o+kvcrush:budget=12,crush=4,sink=2,recent=4,anchor=mean") as cache:
        out, recorder = generate_recorded(model, cache, ids, mask, 8)
    sequence = out.sequences[:, :-1]
    full_mask = torch.cat([mask, torch.ones(2, sequence.shape[1] - ids.shape[1], dtype=mask.dtype)], dim=1)
    reference = oracle_logits(
        model, sequence, generation_positions(full_mask), oracle_masks(model, cache, recorder, mask, sequence.shape[1])
    )
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits, reference[:, ids.shape[1] - 1 + step], atol=2e-5, rtol=0)


def test_all_sliding_mistral_is_rejected():
    with pytest.raises(ValueError, match="no full-attention layer"), crushkv.compress(_mistral(4096), "h2o:budget=64"):
        pass
