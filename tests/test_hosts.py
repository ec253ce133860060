"""Attention-free hosts against plain re-statements of their definitions (KeyDiff, LagKV)."""

from __future__ import annotations

import pytest
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


def test_unrotate_inverts_the_models_rope():
    from conftest import tiny_qwen2
    from crushkv.rope import find_rope, rotate_half, unrotate

    rope = find_rope(tiny_qwen2())
    positions = torch.arange(30).expand(2, 30)
    cos, sin = rope(positions, "full_attention")
    x = torch.randn(2, 3, 30, cos.shape[-1])
    rotated = x * cos[:, None] + rotate_half(x) * sin[:, None]
    torch.testing.assert_close(unrotate(rotated, cos[:, None], sin[:, None]), x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("positions", ["default", "from-mask"])
def test_expected_attention_statistics_are_those_of_the_pre_rope_queries(positions):
    """The query mean that Expected Attention rotates equals the mean of ``q_proj``'s own output (captured), over
    each row's real tokens after the sink, for a left-padded batch."""
    import crushkv
    from conftest import batch_inputs, tiny_llama
    from crushkv.policies.expected_attention import STATISTICS
    from crushkv.rope import mean_rotation
    from oracle import generation_positions

    torch.manual_seed(0)
    model = tiny_llama().eval()
    ids, mask = batch_inputs(batch=2, length=24, pad=5)
    captured = {}
    attn = model.model.layers[1].self_attn
    hook = attn.q_proj.register_forward_hook(lambda mod, args, out: captured.setdefault("q", out))
    spec = "expected_attention:budget=12,sink=2,recent=4,future=16"
    position_ids = None if positions == "default" else generation_positions(mask)  # what generate passes
    with torch.no_grad(), crushkv.compress(model, spec) as cache:
        model(ids, attention_mask=mask, position_ids=position_ids, **crushkv.cache_kwargs(model, cache))
    hook.remove()
    layer = cache.layers[1]
    mean, cov = layer.extras[STATISTICS]
    heads, d = model.config.num_attention_heads, attn.head_dim
    q = captured["q"].view(2, 24, heads, d).transpose(1, 2)  # pre-RoPE
    for row, pad in ((0, 5), (1, 0)):
        real = q[row, :, pad + 2 :]  # after the row's padding and its 2 sink tokens
        last = 24 if positions == "default" else 24 - pad  # the row's last RoPE position + 1
        future = torch.arange(last, last + 16)[None]
        rotation = mean_rotation(*cache.rope(future, "full_attention"))[0]
        torch.testing.assert_close(mean[row], real.mean(1) @ rotation.T, atol=1e-5, rtol=1e-4)
        centred = real - real.mean(1, keepdim=True)
        want = rotation @ (centred.transpose(1, 2) @ centred / real.shape[1]) @ rotation.T
        torch.testing.assert_close(cov[row], want, atol=1e-5, rtol=1e-4)
