"""Proof 5: eviction frees real storage; bytes held track kept/total of an uncompressed cache within 2%."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import crushkv
from crushkv.cache import CompressedLayer

PROMPT = 200
BUDGET = 50


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def _check_layers(cache, seen: int) -> None:
    for layer in cache.layers:
        if not isinstance(layer, CompressedLayer):
            continue
        kept = layer.keys.shape[-2]
        full = 2 * layer.keys.shape[0] * layer.keys.shape[1] * seen * layer.keys.shape[-1] * layer.keys.element_size()
        held = _storage(layer.keys) + _storage(layer.values)
        assert held == (layer.keys.numel() + layer.values.numel()) * layer.keys.element_size(), "storage not compact"
        assert held <= kept / seen * full * 1.02


@pytest.mark.parametrize("spec", [f"snapkv:budget={BUDGET},window=8", f"h2o+kvcrush:budget={BUDGET},crush=16,recent=8"])
def test_storage_shrinks_at_every_step(arch_model, spec):
    _, model = arch_model
    ids = torch.randint(1, 90, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), crushkv.compress(model, spec) as cache:
        out = model(ids, **crushkv.cache_kwargs(model, cache))
        _check_layers(cache, PROMPT)
        assert all(cache.kept_tokens()[i] == BUDGET for i in cache.compressed_layers)
        token = out.logits[:, -1:].argmax(-1)
        for step in range(1, 6):
            out = model(token, **crushkv.cache_kwargs(model, cache))
            token = out.logits[:, -1:].argmax(-1)
            _check_layers(cache, PROMPT + step)
        assert cache.nbytes() < cache.full_nbytes()


def test_full_nbytes_matches_a_dynamic_cache(arch_model):
    _, model = arch_model
    ids = torch.randint(1, 90, (2, 40), generator=torch.Generator().manual_seed(1))
    reference = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **crushkv.cache_kwargs(model, reference))
        with crushkv.compress(model, "full") as cache:
            model(ids, **crushkv.cache_kwargs(model, cache))
    logical = sum((layer.keys.numel() + layer.values.numel()) * layer.keys.element_size() for layer in reference.layers)
    storage = sum(_storage(layer.keys) + _storage(layer.values) for layer in reference.layers)
    assert cache.full_nbytes() == logical
    # real storage: the same as transformers' own cache (whose sliding layers keep a view of the whole prompt)
    assert cache.nbytes() == storage


def test_mask_sizes_accept_count_or_cache_position(arch_model):
    """transformers < 5.3 passes ``cache_position`` to ``get_mask_sizes``; later versions pass the query length."""
    _, model = arch_model
    ids = torch.randint(1, 90, (1, PROMPT), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), crushkv.compress(model, f"snapkv:budget={BUDGET},window=8") as cache:
        model(ids, **crushkv.cache_kwargs(model, cache))
        for i in cache.compressed_layers:
            layer = cache.layers[i]
            assert layer.get_mask_sizes(torch.arange(PROMPT, PROMPT + 3)) == layer.get_mask_sizes(3)
            assert layer.get_mask_sizes(3) == (BUDGET + 3, PROMPT - BUDGET)
