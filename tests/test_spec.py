"""Spec strings: parsing, canonical form and clear errors for bad input."""

from __future__ import annotations

import pytest
from transformers import GPT2Config, GPT2LMHeadModel

import crushkv
from crushkv.policies import KVCrush, parse_policy
from policy_matrix import all_specs


@pytest.mark.parametrize("spec", all_specs(budget=64) + all_specs(budget=0.5))
def test_canonical_spec_round_trips(spec):
    policy = parse_policy(spec)
    again = parse_policy(policy.spec)
    assert again == policy
    assert again.spec == policy.spec


def test_issue_examples_parse():
    assert parse_policy("full").compresses is False
    assert parse_policy("streaming:budget=512,sink=4").sink == 4
    h2o = parse_policy("h2o:budget=512,recent=32")
    assert (h2o.budget, h2o.recent, h2o.phase) == (512, 32, "decode")
    snap = parse_policy("snapkv:budget=0.25,window=32,kernel=7")
    assert (snap.budget, snap.window, snap.kernel, snap.phase) == (0.25, 32, 7, "prefill")
    crush = parse_policy("h2o+kvcrush:budget=512,crush=384,anchor=mean")
    assert isinstance(crush, KVCrush) and crush.crush == 384 and crush.anchor == "mean" and crush.phase == "decode"
    block = parse_policy("snapkv+kvcrush:budget=1024,crush=0.25,anchor=alternate,granularity=block,block=32")
    assert (block.granularity, block.block, block.crush) == ("block", 32, 0.25)


def test_options_at_their_default_stay_out_of_canonical_specs():
    """``h2o``'s ``stride`` came later: at 1 it is not printed, so earlier result files keep their identity."""
    assert "stride" not in parse_policy("h2o:budget=64").spec
    assert "stride" not in parse_policy("h2o+kvcrush:budget=512,crush=384").spec
    sampled = parse_policy("h2o:budget=64,stride=4")
    assert "stride=4" in sampled.spec and parse_policy(sampled.spec) == sampled


def test_interval_auto_scales_with_the_layer_budget():
    policy = parse_policy("h2o+kvcrush:budget=0.25,crush=0.25,interval=AUTO")
    assert policy.interval == "auto" and "interval=auto" in policy.spec and parse_policy(policy.spec) == policy
    # 1 + budget // 64: at most budget/64 (1.6 %) extra tokens between cuts
    assert [policy.interval_for(b) for b in (40, 63, 64, 256, 1024, 2048)] == [1, 1, 2, 5, 17, 33]
    assert parse_policy("tova:budget=64,interval=3").interval_for(1024) == 3


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("h2oo:budget=10", "valid policies: expected_attention, full, h2o"),
        ("h2o:budgt=10", "valid keys: budget"),
        ("h2o:budget=10,anchor=mean", "unknown key 'anchor'"),
        ("h2o+kvcrush:budget=512,crush=384,anchor=median", "valid anchors: random, mean"),
        ("h2o:budget=20,sink=4,recent=32", "smaller than sink+recent"),
        ("h2o+kvcrush:budget=64,crush=60,recent=8", "fewer than its sink+recent"),
        ("kvcrush:budget=64", "kvcrush wraps a host"),
        ("h2o+snapkv:budget=64", "wrappers are +adakv and +kvcrush"),
        ("h2o+kvcrush+adakv:budget=64", "in that order"),
        ("full+kvcrush:crush=4", "compressing host"),
        ("full:budget=512", "full keeps every token: it takes no 'budget'"),
        ("h2o:budget=0,sink=0,recent=0", "at least 1 token"),
        ("h2o:budget=64,budget=32", "given twice"),
        ("h2o:budget=64,store=disk", "store must be one of dense, paged"),
        ("h2o:budget=64,store=paged,page=0", "page must be an int >= 1"),
        ("tova+adakv:budget=64", "head-wise budgets need a per-head host"),
        ("h2o+adakv:budget=64,floor=2.0", "floor must be a fraction"),
        ("h2o+adakv+kvcrush:budget=64,crush=8,granularity=block", "cannot wrap +adakv"),
        ("h2o+kvcrush:budget=64,crush=8,kvcrush.window=3", "no part 'kvcrush' with a key 'window'"),
        ("h2o", "a budget is required"),
        ("h2o:budget=1.5", "ratio of the context"),
        ("h2o:budget=ten", "must be a number"),
        ("h2o:budget=64,phase=later", "phase must be one of"),
        ("h2o:budget", "expected key=value"),
        ("h2o+kvcrush:budget=64,granularity=page", "granularity must be one of"),
        ("snapkv:budget=64,kernel=4", "positive odd"),
        ("h2o:budget=64,stride=0", "stride must be an int >= 1"),
        ("h2o:budget=64,interval=0", "interval must be an int >= 1 or 'auto'"),
        ("h2o+kvcrush:budget=64,crush=16,interval=sometimes", "interval must be an int >= 1 or 'auto'"),
        ("", "non-empty"),
    ],
)
def test_bad_specs_fail_clearly(spec, message):
    with pytest.raises(ValueError, match=message.replace("+", r"\+").replace("(", r"\(")):
        parse_policy(spec)


def test_unsupported_model_is_rejected():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="unsupported model type 'gpt2'"), crushkv.compress(model, "h2o:budget=64"):
        pass


def test_a_prompt_shorter_than_the_always_kept_tokens_is_not_compressed(arch_model):
    """A ratio budget below sink + recent is raised to them (never a crash inside generate), and the summary says so."""
    import torch

    _, model = arch_model
    ids = torch.randint(1, 90, (1, 20))
    with torch.no_grad():
        reference = model(ids).logits
        with crushkv.compress(model, "snapkv+kvcrush:budget=0.25,crush=0.25,sink=4,recent=32") as c:
            logits = model(ids, **crushkv.cache_kwargs(model, c)).logits
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)
    assert {c.kept_tokens()[i] for i in c.compressed_layers} == {20}
    assert any("raised to sink+recent=36 (nothing is evicted)" in note for note in c.summary()["notes"])
    with torch.no_grad(), crushkv.compress(model, "h2o:budget=0.1,sink=4,recent=8") as c:
        model(ids, **crushkv.cache_kwargs(model, c))
    assert {c.kept_tokens()[i] for i in c.compressed_layers} == {12}
    assert any("is 2 tokens: raised to sink+recent=12" in note for note in c.summary()["notes"])


def test_kvcrush_default_phase_is_the_same_for_objects_and_specs():
    from crushkv.policies import REGISTRY

    snapkv = REGISTRY["snapkv"]
    assert KVCrush(host=snapkv(budget=64)) == parse_policy("snapkv+kvcrush:budget=64")
    assert KVCrush(host=snapkv(budget=64)).phase == "decode"
    assert KVCrush(host=snapkv(budget=64, phase="prefill")).phase == "prefill"
    assert parse_policy("snapkv+kvcrush:budget=64,phase=prefill").phase == "prefill"
    assert any("KVCrush's default" in n for n in parse_policy("snapkv+kvcrush:budget=64").notes())
    assert any("grows past the budget" in n for n in parse_policy("snapkv:budget=64").notes())
    assert not parse_policy("h2o:budget=64").notes()


def test_nesting_compress_on_one_model_is_an_error(arch_model):
    _, model = arch_model
    with (
        crushkv.compress(model, "h2o:budget=64"),
        pytest.raises(RuntimeError, match="already active"),
        crushkv.compress(model, "snapkv:budget=64"),
    ):
        pass
    with crushkv.compress(model, "h2o:budget=64"):  # the outer block cleaned up after itself
        pass


def test_generate_without_the_cache_inside_the_block_warns(arch_model):
    import torch

    _, model = arch_model
    ids = torch.randint(1, 90, (1, 12))
    with crushkv.compress(model, "h2o:budget=64"), pytest.warns(UserWarning, match="was not given its CrushCache"):
        model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)


def test_cache_outside_its_context_is_an_error(arch_model):
    import torch

    _, model = arch_model
    with crushkv.compress(model, "h2o:budget=16,sink=2,recent=4") as cache:
        pass
    with pytest.raises(RuntimeError, match="only valid inside"):
        model(torch.randint(1, 90, (1, 8)), **crushkv.cache_kwargs(model, cache))


def test_quant_keys_on_every_policy_full_included():
    """``full:quant=int4`` is plain KIVI-4; ``snapkv+kvcrush:...,quant=int4`` is eviction + KIVI; the defaults
    (group 32, residual 128) stay out of canonical specs, as does ``quant=none``."""
    kivi = parse_policy("full:quant=INT4")
    assert (kivi.quant, kivi.group, kivi.residual) == ("int4", 32, 128) and kivi.spec == "full:quant=int4"
    crush = parse_policy("snapkv+kvcrush:budget=0.5,quant=int2,group=16,residual=64")
    assert (crush.quant, crush.group, crush.residual) == ("int2", 16, 64)
    assert parse_policy(crush.spec) == crush and "quant=int2" in crush.spec
    assert "quant" not in parse_policy("h2o:budget=64").spec


def test_tier_keys_round_trip_and_reach_wrappers():
    """``tier=`` sits on the host and is read through wrappers; ``group=`` sets the tier's channel groups without
    ``quant=``; ``tier=drop`` (the default) stays out of canonical specs."""
    crush = parse_policy("snapkv+kvcrush:budget=0.5,crush=0.25,tier=INT2,group=16")
    assert (crush.tier, crush.group, crush.quant) == ("int2", 16, "none")
    assert parse_policy(crush.spec) == crush and "tier=int2" in crush.spec
    assert "tier" not in parse_policy("h2o:budget=64,tier=drop").spec


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("full:quant=int3", "quant must be one of none|int8|int4|int2"),
        ("h2o:budget=64,quant=int4,store=paged", "quant=int4 has its own slot layout on store=dense"),
        ("full:group=16", "add quant=int8|int4|int2"),
        ("h2o:budget=64,quant=int4,group=0", "group must be an int >= 1"),
        ("h2o:budget=64,quant=int4,residual=-1", "residual must be an int >= 0"),
        ("snapkv+kvcrush:budget=64,quant=int4,residual=40000", "residual + group must be <= 32000"),
        ("full:quant=int4,budget=5", "full keeps every token: it takes no 'budget'"),
        ("h2o:budget=64,tier=int3", "tier must be one of drop|int8|int4|int2"),
        ("full:tier=int2", "full keeps every token: it takes no 'tier'"),
        ("h2o:budget=64,residual=64,tier=int2", "add quant=int8|int4|int2"),
    ],
)
def test_bad_quant_specs_fail_clearly(spec, message):
    with pytest.raises(ValueError, match=message.replace("|", r"\|").replace("+", r"\+")):
        parse_policy(spec)
