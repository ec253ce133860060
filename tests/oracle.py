"""Reference for eviction: one full-sequence eager forward whose mask removes exactly the evicted entries.

While a compressed ``generate`` runs, a logits processor records, after every forward pass, the logical positions
each (layer, KV head) keeps. A query at step ``s`` saw exactly the slots kept after step ``s-1`` plus itself, so a
teacher-forced eager forward over the whole sequence with those per-row, per-head masks must reproduce every step's
logits. Sliding-window layers get their usual window mask.

Quantized stores (``quant=``) hold keys/values that differ from the model's: ``record_store_kv`` snapshots, at every
decode pass's attention, the dequantized K/V each such layer's store hands to attention, and the oracle's decode rows
of that layer attend over exactly those tensors (the prompt pass attends at full precision, as the cache does).
A low-precision tier (``tier=``) is recorded the same way: its tokens join the decode rows' masks (``KeptRecorder``
also snapshots ``tier_positions``) and their dequantized K/V the recorded tensors.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
from transformers import AttentionInterface, LogitsProcessor, LogitsProcessorList

from crushkv.api import cache_kwargs
from crushkv.cache import CrushCache
from crushkv.layer import CompressedLayer
from crushkv.stores import QuantStore

ORACLE = "crushkv_oracle"
_MASKS: dict[int, torch.Tensor] = {}
#: per layer, per decode pass: (keys, values) ``[B, H, T, d]`` by position, what the store gave attention
_STORED: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}


def _attend(query, key, value, allowed, scaling):
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    logits = torch.matmul(query, key.transpose(-1, -2)) * (scaling or query.shape[-1] ** -0.5)
    allowed = allowed.repeat_interleave(groups, dim=1)
    probs = torch.softmax(logits.float().masked_fill(~allowed, float("-inf")), dim=-1).to(query.dtype)
    return torch.matmul(probs, value), probs


def _oracle_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kwargs):
    allowed = _MASKS[module.layer_idx]
    out, probs = _attend(query, key, value, allowed, scaling)
    stored = _STORED.get(module.layer_idx, [])
    first = query.shape[2] - len(stored)  # the decode rows: one per recorded pass
    for step, (keys, values) in enumerate(stored):
        row = slice(first + step, first + step + 1)
        out[:, :, row], probs[:, :, row] = _attend(query[:, :, row], keys, values, allowed[:, :, row], scaling)
    return out.transpose(1, 2).contiguous(), probs


@contextlib.contextmanager
def record_store_kv():
    """Within the block, every decode pass of a layer on a ``QuantStore`` or with a tier records ``(positions, valid,
    keys, values)`` of its slots as its attention reads them; yields ``{layer index: [per pass]}``."""
    records: dict[int, list] = defaultdict(list)
    original = CrushCache.run_attention

    def run_attention(self, layer, query, *args, **kwargs):
        # a reconstruction pass (KVzip) is not a decode step: its tokens never reach the sequence
        quantized = isinstance(layer.store, QuantStore) or layer.tier is not None
        if layer.prompt_done and not layer.transient and quantized:
            keys, values = (t.clone() for t in layer.store.dense(layer.hw))
            positions, valid = layer.positions.clone(), layer.valid.clone()
            if layer.tier is not None and len(layer.tier):
                tier_keys, tier_values, tier_positions, tier_valid = layer.tier.dense()
                h = tier_valid.shape[1]
                positions = torch.cat([positions.expand(-1, h, -1), tier_positions], -1)
                valid = torch.cat([valid.expand(-1, h, -1), tier_valid], -1)
                keys, values = torch.cat([keys, tier_keys], 2), torch.cat([values, tier_values], 2)
            records[layer.layer_idx].append((positions, valid, keys, values))
        return original(self, layer, query, *args, **kwargs)

    CrushCache.run_attention = run_attention
    try:
        yield records
    finally:
        CrushCache.run_attention = original


def stored_by_position(records, total: int) -> dict[int, list[tuple[torch.Tensor, torch.Tensor]]]:
    """``record_store_kv``'s slots rearranged by position: ``[B, H, total, d]`` per pass (zeros where not held)."""
    out = {}
    for idx, passes in records.items():
        out[idx] = []
        for positions, valid, keys, values in passes:
            where = torch.where(valid, positions, total)[..., None]
            by_position = []
            for t in (keys, values):
                buffer = t.new_zeros(*t.shape[:2], total + 1, t.shape[-1])
                buffer.scatter_(2, where.expand_as(t), t)
                by_position.append(buffer[:, :, :total])
            out[idx].append(tuple(by_position))
    return out


AttentionInterface.register(ORACLE, _oracle_attention)


class KeptRecorder(LogitsProcessor):
    """Logits processor that snapshots ``kept_positions`` of every compressed layer after each forward."""

    def __init__(self, cache) -> None:
        self.cache = cache
        self.history: list[dict[int, torch.Tensor]] = []
        #: per step, the positions of each layer's low-precision tier (empty tensors without one)
        self.tiers: list[dict[int, torch.Tensor]] = []

    def __call__(self, input_ids, scores):
        self.history.append({i: self.cache.kept_positions(i) for i in self.cache.compressed_layers})
        self.tiers.append({i: self.cache.tier_positions(i) for i in self.cache.compressed_layers})
        return scores


def generate_recorded(model, cache, ids, mask, new_tokens: int, **kwargs):
    """Greedy (or sampled) generate with ``cache``; returns (output, recorder)."""
    recorder = KeptRecorder(cache)
    out = model.generate(
        ids,
        attention_mask=mask,
        **cache_kwargs(model, cache),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
        logits_processor=LogitsProcessorList([recorder]),
        **kwargs,
    )
    return out, recorder


def oracle_masks(
    model, cache, recorder: KeptRecorder, prompt_mask: torch.Tensor, total: int
) -> dict[int, torch.Tensor]:
    """``[B, kv_heads, T, T]`` visibility per layer for the teacher-forced sequence of length ``total``."""
    batch, prompt = prompt_mask.shape
    valid = torch.cat([prompt_mask.bool(), torch.ones(batch, total - prompt, dtype=torch.bool)], dim=1)
    i = torch.arange(total)
    causal = (i[None, :] <= i[:, None])[None, None] & valid[:, None, None, :]
    itself = torch.eye(total, dtype=torch.bool)[None, None]
    masks = {}
    for idx, layer in enumerate(cache.layers):
        heads = model.config.get_text_config().num_key_value_heads
        allowed = causal.expand(batch, heads, total, total).clone()
        if isinstance(layer, CompressedLayer):
            for step in range(1, total - prompt + 1):
                row = prompt + step - 1
                kept = recorder.history[step - 1][idx]  # positions held after the previous forward, -1 = none
                seen = torch.zeros(batch, heads, total + 1, dtype=torch.bool)
                seen.scatter_(-1, torch.where(kept >= 0, kept, total), True)
                tier = recorder.tiers[step - 1][idx]
                if tier.numel():
                    seen.scatter_(-1, torch.where(tier >= 0, tier, total), True)
                allowed[:, :, row, :] = seen[..., :total]
                allowed[:, :, row, row] = True
            allowed &= valid[:, None, None, :]
            if layer.window is not None:
                allowed &= (i[:, None] - i[None, :] < layer.window)[None, None]
        else:
            window = layer.sliding_window
            allowed &= (i[:, None] - i[None, :] < window)[None, None]
        masks[idx] = allowed | itself
    return masks


def oracle_logits(
    model, sequence: torch.Tensor, positions: torch.Tensor, masks: dict[int, torch.Tensor], stored=None
) -> torch.Tensor:
    """Logits of the teacher-forced forward under ``masks`` (eager maths); ``stored`` (``stored_by_position``):
    the K/V the decode rows of those layers attend over instead of the forward's own."""
    _MASKS.clear()
    _MASKS.update(masks)
    _STORED.clear()
    _STORED.update(stored or {})
    previous = model.config._attn_implementation
    model.set_attn_implementation(ORACLE)
    try:
        with torch.no_grad():
            return model(sequence, position_ids=positions, use_cache=False).logits
    finally:
        model.set_attn_implementation(previous)
        _MASKS.clear()
        _STORED.clear()


def generation_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids as ``generate`` derives them from a left-padded mask."""
    positions = mask.long().cumsum(-1) - 1
    return positions.masked_fill(mask == 0, 1)
