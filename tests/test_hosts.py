"""Attention-free hosts against plain re-statements of their definitions (KeyDiff, LagKV)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from crushkv.policies import parse_policy
from fake_layer import FakeLayer


def _layer(length: int = 40, pad: int = 3) -> FakeLayer:
    gen = torch.Generator().manual_seed(7)
    valid = torch.ones(2, length, dtype=torch.bool)
    valid[0, :pad] = False
    return FakeLayer(torch.rand(2, 2, 3, length, generator=gen), valid)


def test_keydiff_is_minus_the_cosine_to_the_mean_unit_key():
    layer = _layer()
    scores = parse_policy("keydiff:budget=16,sink=2,recent=4").head_scores(layer)[:, :, 0]
    keys, valid = layer.cached_keys(), layer.valid
    for b in range(2):
        for h in range(2):
            real = keys[b, h][valid[b, h]]
            anchor = F.normalize(real, dim=-1).mean(0)
            want = -F.cosine_similarity(real, anchor[None], dim=-1)
            torch.testing.assert_close(scores[b, h][valid[b, h]], want)


def test_lagkv_ranks_each_partition_against_the_next():
    layer = _layer(length=40, pad=3)
    lag, sink = 8, 2
    scores = parse_policy(f"lagkv:budget=16,sink={sink},recent=4,lag={lag}").head_scores(layer)[:, :, 0]
    keys, values = layer.cached_keys(), layer.cached_values()
    for b in range(2):
        for h in range(2):
            real = layer.valid[b, h].nonzero().squeeze(1)[sink:]
            parts = len(real) // lag
            for p in range(parts - 1):
                cur, ref = real[p * lag : (p + 1) * lag], real[(p + 1) * lag : (p + 2) * lag]
                spread = 0
                for x in (keys[b, h], values[b, h]):
                    lo, hi = x[ref].min(0).values, x[ref].max(0).values
                    spread = spread + ((x[cur] - lo) / (hi - lo)).std(-1).softmax(-1) / 2
                ranks = spread.argsort().argsort().float() / lag
                torch.testing.assert_close(scores[b, h, cur], ranks)
            assert (scores[b, h, real[(parts - 1) * lag :]] == 1).all()  # no reference: kept first


def test_lagkv_on_a_short_sequence_keeps_the_latest_tokens():
    layer = _layer(length=12, pad=0)
    scores = parse_policy("lagkv:budget=8,sink=2,recent=2,lag=8").head_scores(layer)[0, 0, 0]
    assert (scores[2:].diff() > 0).all()
