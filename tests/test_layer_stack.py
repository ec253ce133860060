"""Cross-layer batched eviction (``crushkv.layer_stack``) keeps exactly what layer-by-layer selection keeps."""

from __future__ import annotations

import functools
from unittest import mock

import pytest
import torch

import crushkv
import crushkv.cache as cache_module
from conftest import batch_inputs
from crushkv import layer_stack
from crushkv.layer import CompressedLayer
from crushkv.layer_stack import DEFER_MAX_BYTES, LayerStack, batchable
from crushkv.policies import parse_policy
from crushkv.profiling import PROFILER
from oracle import generate_recorded
from policy_matrix import all_specs

NEW_TOKENS = 12


def _run(model, spec: str, batched: bool, interval: int | None = None):
    """Greedy generation; returns (output, kept positions per layer at every step, profiler call counts).

    ``batched=False`` is the layer-by-layer reference: one selection per layer, the prompt cut right after each layer.
    """
    ids, mask = batch_inputs(batch=2, length=24, pad=5)
    if interval is not None:
        spec = f"{spec},interval={interval}"
    per_layer = functools.partial(layer_stack.evict, batched=batched)
    with (
        PROFILER.recording() as prof,
        mock.patch.object(cache_module, "evict", per_layer),
        crushkv.compress(model, spec) as cache,
    ):
        cache.defer_bytes = DEFER_MAX_BYTES if batched else 0
        out, recorder = generate_recorded(model, cache, ids, mask, NEW_TOKENS, do_sample=False)
        assert not cache.pending, "evictions left queued after a pass"
        calls = dict(prof.calls)
    return out, recorder.history, calls


def _assert_same_kept(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for step_got, step_want in zip(got, want, strict=True):
        assert step_got.keys() == step_want.keys()
        for layer in step_got:
            assert torch.equal(step_got[layer], step_want[layer])


MATRIX = [s for phase in ("decode", "prefill") for s in all_specs(budget=12, phase=phase) if s != "full"]


@pytest.mark.parametrize("spec", MATRIX)
def test_batched_eviction_matches_per_layer(arch_model, spec):
    _, model = arch_model
    want, want_kept, per_layer = _run(model, spec, batched=False)
    got, got_kept, batched = _run(model, spec, batched=True)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits, strict=True):
        assert torch.equal(a, b)
    _assert_same_kept(got_kept, want_kept)
    # the eviction really ran (the budget is below the prompt) and, where allowed, once per pass instead of per layer
    assert per_layer["select"] > 0
    if batchable(parse_policy(spec)) and "granularity=block" not in spec:
        assert batched["select"] < per_layer["select"]


def _prompt_groups(model, spec: str, defer_bytes: int, monkeypatch) -> tuple[list[list[int]], int]:
    """Layers cut together in each eviction of one prompt pass, and the uncompressed bytes of one layer."""
    groups = []
    real_evict = cache_module.evict

    def recording_evict(pending, batched=True):
        groups.append([layer.layer_idx for layer, _ in pending])
        sizes.append(sum(layer.store.nbytes() for layer, _ in pending))
        real_evict(pending, batched)

    sizes: list[int] = []
    monkeypatch.setattr(cache_module, "evict", recording_evict)
    ids, mask = batch_inputs(batch=2, length=24, pad=5)
    with torch.no_grad(), crushkv.compress(model, spec) as cache:
        cache.defer_bytes = defer_bytes
        model(ids, attention_mask=mask, **crushkv.cache_kwargs(model, cache))
        assert not cache.pending
        assert all(cache.kept_tokens()[i] == 12 for i in cache.compressed_layers)
        one = next(layer for layer in cache.layers if isinstance(layer, CompressedLayer))
        b, h = one.valid.shape[:2]
        layer_bytes = 24 * b * h * (one.key_dim + one.value_dim) * one.dtype.itemsize  # one uncompressed prompt
    assert all(size <= max(defer_bytes, layer_bytes) for size in sizes)
    return groups, int(layer_bytes)


def test_prompt_cuts_are_batched_within_the_byte_cap(arch_model, monkeypatch):
    """Prompt layers are cut together while their uncompressed K/V fit ``defer_bytes``; 0 cuts layer by layer."""
    _, model = arch_model
    spec = "h2o+kvcrush:budget=12,sink=2,recent=4,crush=4,anchor=mean"
    compressed = [i for i, t in enumerate(getattr(model.config, "layer_types", None) or []) if t == "full_attention"]
    compressed = compressed or list(range(model.config.num_hidden_layers))
    one_by_one, layer_bytes = _prompt_groups(model, spec, 0, monkeypatch)
    assert one_by_one == [[i] for i in compressed]
    everything, _ = _prompt_groups(model, spec, DEFER_MAX_BYTES, monkeypatch)
    assert everything == [compressed]
    pairs, _ = _prompt_groups(model, spec, 2 * layer_bytes, monkeypatch)
    assert pairs == [compressed[i : i + 2] for i in range(0, len(compressed), 2)]


def test_interval_schedule_batches_too(arch_model):
    _, model = arch_model
    spec = "h2o+kvcrush:budget=12,sink=2,recent=4,crush=4,anchor=mean"
    want, want_kept, _ = _run(model, spec, batched=False, interval=3)
    got, got_kept, _ = _run(model, spec, batched=True, interval=3)
    assert torch.equal(got.sequences, want.sequences)
    _assert_same_kept(got_kept, want_kept)


def test_cache_is_at_budget_after_every_decode_step(arch_model):
    """Deferral happens inside one forward pass: between passes no layer holds more than its budget."""
    _, model = arch_model
    ids, mask = batch_inputs(batch=2, length=24, pad=5)
    with torch.no_grad(), crushkv.compress(model, "h2o+kvcrush:budget=12,sink=2,recent=4,crush=4") as cache:
        out = model(ids, attention_mask=mask, **crushkv.cache_kwargs(model, cache))
        for _ in range(5):
            token = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
            out = model(token, attention_mask=mask, **crushkv.cache_kwargs(model, cache))
            assert not cache.pending
            assert {cache.kept_tokens()[i] for i in cache.compressed_layers} == {12}


def test_stack_exposes_only_layer_agnostic_fields(arch_model):
    """A policy reading per-layer identity from a stack fails loudly instead of mixing layers."""
    _, model = arch_model
    ids, mask = batch_inputs(batch=2, length=24, pad=5)
    with torch.no_grad(), crushkv.compress(model, "h2o:budget=64,sink=2,recent=4") as cache:
        model(ids, attention_mask=mask, **crushkv.cache_kwargs(model, cache))
        layers = [cache.layers[i] for i in cache.compressed_layers]
        stack = LayerStack(layers)
        assert stack.valid.shape[0] == 2 * len(layers)
        assert len(layers) > 1
        assert torch.equal(stack.cached_keys()[2:4], layers[1].cached_keys())
        for name in ("rank", "layer_idx", "generator", "extras"):
            with pytest.raises(AttributeError):
                getattr(stack, name)
