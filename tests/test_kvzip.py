"""KVzip: the reconstruction scores against a plain reference, the passes leave the cache as it was, budgets spread
over layers, shared reconstructions in forks, and clear errors. (The oracle, equivalence, memory and fork matrices
cover ``kvzip`` with every wrapper and store through ``policy_matrix``.)"""

from __future__ import annotations

import math

import pytest
import torch

import crushkv
from conftest import batch_inputs, tiny_llama
from conftest_eval import tiny_model, tiny_tokenizer
from crushkv import reconstruct
from crushkv.fork import prefill_forks
from crushkv.policies import parse_policy
from crushkv.policies.kvzip import FIRST_PROMPT, NEXT_PROMPT, SCORE, chunk_scores
from crushkv.reconstruct import instruction_ids


def _reference(query, keys, positions, valid, row_valid, bounds, sink_end, first_new, scaling):
    """Query by query, over exactly the keys KVzip's softmax sees (sinks, the chunk, the pass up to the query)."""
    b, hq, q, _ = query.shape
    h, n = keys.shape[1], keys.shape[2]
    out = torch.zeros(b, h, n)
    for r in range(b):
        lo, hi = bounds[r].tolist()
        for head in range(hq):
            kv = head // (hq // h)
            for i in range(q):
                if not row_valid[r, i]:
                    continue
                pos, ok = positions[r, kv], valid[r, kv]
                sees = ok & (
                    (pos < sink_end[r]) | ((pos >= lo) & (pos < hi)) | ((pos >= first_new) & (pos <= first_new + i))
                )
                logits = (keys[r, kv] @ query[r, head, i]) * scaling
                probs = torch.where(sees, logits, -math.inf).softmax(-1)
                chunk = ok & (pos >= lo) & (pos < hi)
                out[r, kv] = torch.where(chunk, torch.maximum(out[r, kv], probs), out[r, kv])
    return out


def test_chunk_scores_match_the_reference():
    gen = torch.Generator().manual_seed(0)
    b, hq, h, d, prompt, q = 2, 4, 2, 8, 20, 7
    n = prompt + q
    query = torch.randn(b, hq, q, d, generator=gen)
    keys = torch.randn(b, h, n, d, generator=gen)
    # slots out of position order, some freed, the pass's tokens at the end; row 1 left-padded by 3
    order = torch.stack([torch.randperm(prompt, generator=gen) for _ in range(b * h)]).view(b, h, prompt)
    positions = torch.cat([order, torch.arange(prompt, n).expand(b, h, q)], -1)
    valid = torch.rand(b, h, n, generator=gen) > 0.2
    valid[1, :, :][positions[1] < 3] = False
    valid[..., prompt:] = True
    row_valid = torch.ones(b, q, dtype=torch.bool)
    row_valid[1, :2] = False  # padding queries see nothing and add nothing
    valid[1, :, prompt : prompt + 2] = False
    bounds = torch.tensor([[2, 11], [9, 20]])
    sink_end = torch.tensor([2, 5])
    got = chunk_scores(query, keys, positions, valid, row_valid, bounds, sink_end, prompt, 0.35)
    want = _reference(query, keys, positions, valid, row_valid, bounds, sink_end, prompt, 0.35)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert (got[0][(positions[0] < 2) | (positions[0] >= 11)] == 0).all()  # nothing outside the chunk


def _prompt_cache(model, spec, ids, mask, tokenizer=None):
    with torch.no_grad(), crushkv.compress(model, spec, tokenizer=tokenizer) as cache:
        model(ids, attention_mask=mask, **crushkv.cache_kwargs(model, cache), logits_to_keep=1)
    return cache


def test_reconstruction_leaves_the_prompt_in_the_cache_and_scores_every_real_token():
    model = tiny_llama().eval()
    ids, mask = batch_inputs(batch=2, length=24, pad=5)
    cache = _prompt_cache(model, "kvzip:budget=24,sink=2,recent=0,chunk=5,prompt=none", ids, mask)
    plain = _prompt_cache(model, "full", ids, mask)
    assert cache.get_seq_length() == 24
    for i in cache.compressed_layers:
        layer, reference = cache.layers[i], plain.layers[i]
        assert torch.equal(layer.kept_positions(), reference.kept_positions())  # budget >= prompt: nothing cut
        assert torch.equal(layer.cached_keys(), reference.cached_keys())
        scores = layer.state[SCORE]
        real = layer.valid & (layer.positions >= layer.start[:, None, None])
        assert (scores[real] > 0).all() and (scores[~real] == 0).all()  # 5 chunks cover every real token


def test_scope_model_spends_the_budget_over_layers_and_heads(monkeypatch):
    model = tiny_llama().eval()
    ids, mask = batch_inputs(batch=1, length=40, pad=0)
    spec = "kvzip:budget=12,sink=2,recent=0,chunk=16,prompt=none"
    real_cut = reconstruct.cut

    def boosted_cut(cache):  # the first layer's tokens matter most: a model-wide ranking gives it more of them
        first = cache.layers[cache.compressed_layers[0]]
        first.set_state(SCORE, first.state[SCORE] * 10)
        real_cut(cache)

    monkeypatch.setattr(reconstruct, "cut", boosted_cut)
    model_wide = _prompt_cache(model, spec, ids, mask)
    per_layer = _prompt_cache(model, spec + ",scope=layer", ids, mask)
    heads = model.config.num_key_value_heads
    totals = [int(model_wide.kept_counts(i).sum()) for i in model_wide.compressed_layers]
    assert abs(sum(totals) - 12 * heads * len(totals)) <= heads * len(totals) // 2  # per-layer rounding only
    assert totals[0] > 12 * heads > totals[-1]
    assert all(int(per_layer.kept_counts(i).sum()) == 12 * heads for i in per_layer.compressed_layers)
    counts = per_layer.kept_counts(per_layer.compressed_layers[0])
    assert counts.min() >= 2 and counts.shape == (1, heads)


def test_the_instruction_follows_the_chat_template():
    tok = tiny_tokenizer()
    first, later, suffix = instruction_ids(tok, "auto")
    assert tok.decode(first) == FIRST_PROMPT and tok.decode(later) == NEXT_PROMPT
    rendered = tok.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True, tokenize=False)
    assert suffix and rendered.endswith(tok.decode(suffix))  # the end of the user turn, the assistant's start
    assert instruction_ids(tok, "none") == ([], [], [])
    model = tiny_model()
    ids = tok("startup founders often think about money while users care about things", return_tensors="pt").input_ids
    cache = _prompt_cache(model, "kvzip:budget=10,sink=2,recent=0", ids, torch.ones_like(ids), tokenizer=tok)
    assert cache.get_seq_length() == ids.shape[1] > 10
    total = sum(int(cache.kept_counts(i).sum()) for i in cache.compressed_layers)
    assert abs(total - 10 * 2 * 2) <= 2  # 2 layers x 2 KV heads x budget, up to per-layer rounding


def test_errors_are_clear():
    model = tiny_llama().eval()
    with pytest.raises(ValueError, match="needs the tokenizer"), crushkv.compress(model, "kvzip:budget=10"):
        pass
    with pytest.raises(ValueError, match="phase must be one of"):
        parse_policy("kvzip:budget=10,phase=decode")
    with pytest.raises(ValueError, match="scope must be"):
        parse_policy("kvzip:budget=10,scope=head")
    with pytest.raises(ValueError, match="chunk must be"):
        parse_policy("kvzip:budget=10,chunk=0")
    # KVCrush cannot move KVzip to every-step cuts: its scores exist once, after the prompt
    assert parse_policy("kvzip+kvcrush:budget=20,crush=4,prompt=none").phase == "prefill"


def test_forks_share_one_reconstruction_per_scoring():
    model = tiny_llama().eval()
    ids = torch.randint(1, 90, (1, 30), generator=torch.Generator().manual_seed(1))
    specs = [f"kvzip:budget={b},sink=2,recent=0,prompt=none" for b in (8, 16)]
    specs += [
        "kvzip+kvcrush:budget=16,sink=2,recent=0,prompt=none,crush=4",
        "kvzip:budget=8,sink=2,chunk=7,prompt=none",
    ]
    caches, timing = prefill_forks(model, specs, ids)
    assert timing["reconstructions"] == 2  # chunk=7 scores differently; the rest share one
    for spec, cache in zip(specs, caches):
        alone = _prompt_cache(model, spec, ids, torch.ones_like(ids))
        for i in cache.compressed_layers:
            assert torch.equal(cache.kept_positions(i), alone.kept_positions(i)), spec
