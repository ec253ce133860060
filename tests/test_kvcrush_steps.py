"""Proof 4: KVCrush steps reproduce the published unit vectors (OpenVINO GenAI tests/cpp/kvcrush.cpp, blk = 4)."""

from __future__ import annotations

import torch

import crushkv
from conftest import batch_inputs
from crushkv.crush import hamming, indicators, make_anchor, pick_representatives, token_signatures
from oracle import generate_recorded


def _bits(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.bool)


def test_indicators_mark_exactly_half():
    scores = torch.rand(20, generator=torch.Generator().manual_seed(0))
    bits = indicators(scores, torch.ones(20, dtype=torch.bool))
    assert int(bits.sum()) == 10
    assert set(scores[bits].tolist()) == set(scores.topk(10).values.tolist())


def test_indicators_respect_the_region():
    scores = torch.arange(10.0)
    region = torch.tensor([False] * 4 + [True] * 6)
    bits = indicators(scores, region)
    assert bits.tolist() == [False] * 7 + [True] * 3


def test_mean_anchor_published_vector():
    ind = _bits([1, 0, 1, 0, 1, 1, 0, 0, 1, 1, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0]).view(5, 4)
    assert make_anchor("mean", ind).int().tolist() == [1, 0, 1, 0]


def test_hamming_published_vector():
    ind = _bits([1, 0, 1, 0, 0, 1, 0, 1, 1, 1, 0, 0]).view(3, 4)
    assert hamming(ind, _bits([1, 0, 1, 0])).tolist() == [0, 4, 2]


def test_representatives_published_vectors():
    distance = torch.tensor([0, 1, 2, 3])
    all_eligible = torch.ones(4, dtype=torch.bool)
    assert sorted(pick_representatives(distance, all_eligible, 2).tolist()) == [0, 2]
    only_odd = _bits([0, 1, 0, 1])
    assert sorted(pick_representatives(distance, only_odd, 2).tolist()) == [1, 3]
    # budget larger than the eligible set: every eligible block, then fillers (padding) only
    distance8 = torch.tensor([0, 1, 2, 3, 0, 0, 0, 0])
    eligible8 = _bits([0, 1, 0, 1, 0, 0, 0, 0])
    reps = pick_representatives(distance8, eligible8, 5, fillers=~eligible8)
    assert sorted(r for r in reps.tolist() if eligible8[r]) == [1, 3]
    assert len(set(reps.tolist())) == 5


def test_anchor_modes():
    sig = _bits([1, 1, 0, 0, 1, 0]).view(2, 3)
    assert make_anchor("zeros", sig).int().tolist() == [0, 0, 0]
    assert make_anchor("ones", sig).int().tolist() == [1, 1, 1]
    assert make_anchor("alternate", sig).int().tolist() == [0, 1, 0]
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(make_anchor("random", sig, generator=g1), make_anchor("random", sig, generator=g2))


def test_token_signatures_one_bit_per_head():
    # 2 heads, 4 tokens: head 0 prefers tokens 0,1; head 1 prefers tokens 2,3
    scores = torch.tensor([[[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]]])
    sig = token_signatures(scores, torch.ones(1, 4, dtype=torch.bool))
    assert sig[0].int().tolist() == [[1, 0], [1, 0], [0, 1], [0, 1]]


def test_mean_anchor_is_all_zeros_at_token_granularity():
    """Every head marks floor(n/2) of its n region tokens, so no signature bit has a strict majority."""
    gen = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 10, 33):
        scores = torch.rand(3, 5, n, generator=gen)
        region = torch.rand(3, n, generator=gen) > 0.3
        signatures = token_signatures(scores, region)
        assert not make_anchor("mean", signatures, region).any()
    # not so at block granularity (bit = token position in a block): the published vector has a majority
    assert make_anchor("mean", _bits([1, 0, 1, 0, 1, 1, 1, 0]).view(2, 4)).any()


def test_mean_and_zeros_anchors_keep_the_same_tokens(arch_model):
    _, model = arch_model
    ids, mask = batch_inputs(batch=2, length=40, pad=5)
    kept = {}
    for anchor in ("mean", "zeros", "ones"):
        with crushkv.compress(model, f"h2o+kvcrush:budget=20,crush=8,sink=2,recent=4,anchor={anchor}") as cache:
            _, recorder = generate_recorded(model, cache, ids, mask, new_tokens=6)
        kept[anchor] = recorder.history
    assert all(
        torch.equal(step_m[layer], step_z[layer])
        for step_m, step_z in zip(kept["mean"], kept["zeros"], strict=True)
        for layer in step_m
    )
    # the test can fail: another anchor changes the kept sets of this run
    assert any(
        not torch.equal(step_m[layer], step_o[layer])
        for step_m, step_o in zip(kept["mean"], kept["ones"], strict=True)
        for layer in step_m
    )
