"""One prompt forward for many policies (``crushkv.fork``): every fork equals a separate run bit for bit."""

from __future__ import annotations

import pytest
import torch

import crushkv
from conftest import batch_inputs
from crushkv.attention_math import EXACT, FLASH
from crushkv.fork import prefill_forks, prompt_path
from crushkv.policies import parse_policy
from policy_matrix import QUANT_OPTIONS, STORE_OPTIONS, all_specs

PROMPT, QUESTION, NEW_TOKENS = 24, 5, 6


def _inputs():
    ids, _ = batch_inputs(batch=1, length=PROMPT + QUESTION, pad=0, seed=3)
    return ids[:, :PROMPT], ids


def _continue(model, cache, full):
    """Question then greedy decoding on a cache that holds the prompt (the question-agnostic protocol)."""
    return model.generate(
        full,
        attention_mask=torch.ones_like(full),
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
        **crushkv.cache_kwargs(model, cache),
    )


def _separate(model, spec, prompt, full):
    with crushkv.compress(model, spec) as cache:
        model(prompt, attention_mask=torch.ones_like(prompt), **crushkv.cache_kwargs(model, cache), logits_to_keep=1)
        kept = {i: cache.kept_positions(i).clone() for i in cache.compressed_layers}
        return kept, _continue(model, cache, full)


@torch.no_grad()  # as the eval harness runs (autograd would take other attention paths)
def _check_forks(model, specs):
    prompt, full = _inputs()
    forks, timing = prefill_forks(model, specs, prompt)
    paths = {prompt_path(parse_policy(s), PROMPT) for s in specs}
    assert timing["forwards"] == len(paths)
    for spec, fork in zip(specs, forks, strict=True):
        kept, reference = _separate(model, spec, prompt, full)
        assert fork.policy.spec == parse_policy(spec).spec
        for layer, positions in kept.items():
            assert torch.equal(fork.kept_positions(layer), positions), (spec, layer)
        with crushkv.compress(model, cache=fork):
            result = _continue(model, fork, full)
        assert torch.equal(result.sequences, reference.sequences), spec
        for got, want in zip(result.logits, reference.logits, strict=True):
            assert torch.equal(got, want), spec  # bit for bit, not within a tolerance


@pytest.mark.parametrize("phase", [None, "decode"])
def test_every_policy_forked_from_one_prompt_equals_its_separate_run(arch_model, phase):
    _, model = arch_model
    _check_forks(model, all_specs(budget=12, phase=phase))


@pytest.mark.parametrize("layout", [*STORE_OPTIONS, *QUANT_OPTIONS])
def test_forks_on_every_store(arch_model, layout):
    _, model = arch_model
    specs = all_specs(budget=0.5, store=layout) if layout in STORE_OPTIONS else all_specs(budget=0.5, quant=layout)
    _check_forks(model, specs)


def test_policies_are_grouped_by_how_the_prompt_output_is_computed():
    assert prompt_path(parse_policy("h2o:budget=40"), 128) == EXACT  # column sums over every row: exact pass
    assert prompt_path(parse_policy("h2o:budget=40,stride=4"), 128) == FLASH  # sampled rows: SDPA's output
    for spec in ("full", "snapkv:budget=40", "streaming:budget=40", "knorm:budget=40", "tova:budget=40"):
        assert prompt_path(parse_policy(spec), 128) == FLASH, spec


def test_bad_prompts_are_clear_errors(arch_model):
    _, model = arch_model
    with pytest.raises(ValueError, match="one unpadded prompt"):
        prefill_forks(model, ["full"], torch.ones(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 2 tokens"):
        prefill_forks(model, ["full"], torch.ones(1, 1, dtype=torch.long))
