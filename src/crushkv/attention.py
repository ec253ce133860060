"""crushkv's attention function, registered in transformers' ``AttentionInterface`` as ``"crushkv"``.

For a ``CompressedLayer`` it rebuilds the mask from the kept slots' logical positions and padding flags, computes
the attention output (SDPA, or one chunked pass when a policy needs every query row's probabilities), hands the
requested statistics to the policy and queues this layer's eviction (run in batches, see ``crushkv.layer_stack``).
Any other layer (sliding-window layers, or a call with a different cache) goes to transformers' SDPA unchanged.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from crushkv.attention_math import attend, visibility
from crushkv.cache import CompressedLayer, CrushCache
from crushkv.layer_stack import DEFER_MAX_TOKENS, evict
from crushkv.profiling import PROFILER

NAME = "crushkv"
#: attribute set on attention modules while a ``compress`` context is active
CACHE_ATTR = "_crushkv_cache"


def crushkv_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """``AttentionInterface`` entry point (same signature, parameter order included, and return as transformers' SDPA
    function: wrappers such as kvpress's attention patch pass ``dropout`` positionally)."""
    cache = getattr(module, CACHE_ATTR, None)
    layer = cache.layers[module.layer_idx] if cache is not None and module.layer_idx < len(cache.layers) else None
    if not isinstance(layer, CompressedLayer) or layer.keys is not key:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    return compressed_attention(layer, query, attention_mask, scaling, kwargs.get("softcap"), cache), None


def new_token_validity(attention_mask: torch.Tensor | None, batch: int, q_len: int) -> torch.Tensor:
    """``[B, q]`` padding flags of this pass's tokens, read off the last query row of the 4-D mask."""
    if attention_mask is None:
        return torch.ones(batch, q_len, dtype=torch.bool)
    last = attention_mask[:, 0, -1, -q_len:]
    last = last if last.dtype == torch.bool else last == 0
    return last.expand(batch, q_len)


def compressed_attention(
    layer: CompressedLayer, query, attention_mask, scaling: float, softcap, cache: CrushCache | None = None
) -> torch.Tensor:
    """Attention of this pass's queries over the layer's kept slots, then statistics and eviction.

    Evictions are queued on ``cache`` and run in batches of same-shape layers (``layer_stack``): a decode pass at its
    last compressed layer, a prompt whenever the queued uncompressed K/V would exceed ``cache.defer_bytes``.
    """
    b, q_len = query.shape[0], query.shape[2]
    if cache is not None and cache.pending and layer.rank == 0:
        cache.evict_pending()  # left over from an interrupted pass
    row_valid = new_token_validity(attention_mask, b, q_len).to(layer.device)
    layer.valid[:, :, -q_len:] = row_valid[:, None, :]
    first = layer.forwards == 0
    if first:
        layer.context_length = layer.seen
    policy = layer.policy
    active = policy.compresses and (policy.phase == "decode" or first)
    request = policy.request(first, q_len) if active else None

    positions, valid = layer.positions, layer.valid
    query_positions = positions[:, :, -q_len:]
    # before any eviction every head holds the same slots: one mask row per batch element is enough
    source = (
        (positions[:, :1], valid[:, :1], query_positions[:, :1])
        if layer.contiguous
        else (positions, valid, query_positions)
    )

    def rows(i0: int, i1: int) -> torch.Tensor:
        return visibility(source[0], source[1], source[2][:, :, i0:i1])

    plain = layer.contiguous and bool(valid.all()) and q_len in (1, layer.physical_length)
    visible = None if plain else visibility(*source)  # None: plain causal prompt, or one unmasked new token
    with PROFILER.section("attention"):
        out, stats = attend(
            query,
            layer.keys,
            layer.values,
            visible,
            visible is None and q_len > 1,
            row_valid,
            scaling,
            softcap,
            request,
            rows,
        )
    if active:
        with PROFILER.section("observe"):
            policy.observe(layer, stats, first)
        budget = policy.budget_for(layer)
        slack = 0 if first else policy.interval_for(budget) - 1
        if layer.physical_length > budget + slack:
            if cache is None:
                evict([(layer, budget)])
            else:
                cache.queue_eviction(layer, budget, short_pass=not first and q_len <= DEFER_MAX_TOKENS)
    layer.forwards += 1
    if cache is not None and cache.pending and layer.rank == layer.num_compressed_layers - 1:
        cache.evict_pending()
    return out


def register() -> None:
    """Register the attention and mask functions under ``"crushkv"`` (idempotent)."""
    AttentionInterface.register(NAME, crushkv_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
