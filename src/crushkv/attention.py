"""crushkv's attention function, registered in transformers' ``AttentionInterface`` as ``"crushkv"``.

For a layer of the active ``CrushCache`` it hands the pass to the cache (``CrushCache.run_attention``: masks from the
kept slots, attention and statistics, policy state, eviction). Any other layer (sliding-window layers, or a forward
pass that was given another cache) goes to transformers' SDPA unchanged; the latter with a warning, because the user
most likely forgot to pass the compressed cache.
"""

from __future__ import annotations

import warnings

from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from crushkv.layer import CompressedLayer

NAME = "crushkv"
#: attribute set on attention modules while a ``compress`` context is active
CACHE_ATTR = "_crushkv_cache"


def crushkv_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """``AttentionInterface`` entry point (same signature, parameter order included, and return as transformers' SDPA
    function: wrappers such as kvpress's attention patch pass ``dropout`` positionally)."""
    cache = getattr(module, CACHE_ATTR, None)
    layer = cache.layers[module.layer_idx] if cache is not None and module.layer_idx < len(cache.layers) else None
    if isinstance(layer, CompressedLayer) and layer.pass_key is key:
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        return cache.run_attention(layer, query, attention_mask, scaling, kwargs.get("position_ids")), None
    if isinstance(layer, CompressedLayer) and not cache.foreign_cache_warned:
        cache.foreign_cache_warned = True
        warnings.warn(
            "crushkv.compress is active but this forward pass was not given its CrushCache, so it runs with an "
            "uncompressed cache: pass **crushkv.cache_kwargs(model, cache) to model(...) / model.generate(...)",
            stacklevel=2,
        )
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def register() -> None:
    """Register the attention and mask functions under ``"crushkv"`` (idempotent)."""
    AttentionInterface.register(NAME, crushkv_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
