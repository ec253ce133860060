"""Scoring the prompt by extra forward passes after it: KVzip's context reconstruction (``policies/kvzip.py``).

A policy with ``reconstructs`` does not cut at the end of its prompt pass. Once the model's forward over the prompt
returns (a forward hook that ``api.installed`` adds, or ``fork.prefill_forks``), ``reconstruct`` feeds the model,
chunk by chunk, an instruction to repeat the context followed by the context itself; each compressed layer computes
its ordinary attention output (so later layers see what they would) and, from the same queries, the chunk's
scores (``CrushCache.reconstruction_pass``); the pass's own tokens are attended over but never stored, so the
cache (and its logical length) is the prompt's again after each pass. The cut follows, with the budgets spread
over layers as the policy's ``scope`` says.

Memory stays bounded by the chunk: a pass holds one layer's slots plus one chunk's reconstruction beside the cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from crushkv.policies.kvzip import FIRST_PROMPT, NEXT_PROMPT, OVERLAP, SCORE
from crushkv.selection import top_mask


@dataclass
class Chunk:
    """What one reconstruction pass scores (read by ``CrushCache.reconstruction_pass``)."""

    bounds: torch.Tensor  # [B, 2] positions [lo, hi) scored per row
    sink_end: torch.Tensor  # [B] positions below are sinks (visible to every reconstruction query)


def instruction_ids(tokenizer: Any, prompt: str) -> tuple[list[int], list[int], list[int]]:
    """Token ids of the first chunk's instruction, the later chunks' instruction and the chat turn change that
    follows it (empty for a tokenizer without a chat template); all empty for ``prompt=none``."""
    if prompt == "none":
        return [], [], []
    if tokenizer is None:
        raise ValueError(
            "kvzip's reconstruction instruction needs the tokenizer: crushkv.compress(model, spec, tokenizer=tok) "
            "(or prompt=none to repeat the context without it)"
        )

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False).input_ids)

    suffix: list[int] = []
    if getattr(tokenizer, "chat_template", None):
        mark = "\x00crushkv-mark\x00"
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": mark}], add_generation_prompt=True, tokenize=False
        )
        suffix = encode(text[text.index(mark) + len(mark) :])  # end of the user turn, start of the assistant's
    return encode(FIRST_PROMPT), encode(NEXT_PROMPT), suffix


@torch.no_grad()
def score(model: Any, cache: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
    """Run the reconstruction passes of ``cache`` (which holds the uncut prompt ``input_ids``, ``[B, L]``) and leave
    each compressed layer's scores in its state; the cache holds the prompt alone, as before, afterwards."""
    from crushkv.api import cache_kwargs

    policy = cache.policy.scorer()
    layers = [cache.layers[i] for i in cache.compressed_layers]
    lead = layers[0]
    b, length = input_ids.shape
    if lead.seen != length:
        raise ValueError(f"reconstruction expects the cache to hold the {length}-token prompt, it holds {lead.seen}")
    first, later, suffix = instruction_ids(cache.tokenizer, policy.prompt)
    starts = lead.start.tolist()
    rows = [input_ids[r, starts[r] :].tolist() for r in range(b)]  # each row's real tokens
    size = policy.chunk
    pad = 0  # the id under padding is never seen
    context_mask = torch.ones(b, length, dtype=torch.long) if attention_mask is None else attention_mask.long().cpu()
    for c in range(math.ceil(max(len(r) for r in rows) / size)):
        inputs, bounds = [], []
        for r, tokens in enumerate(rows):
            part = tokens[c * size : (c + 1) * size]
            lead_in = first if c == 0 else later + tokens[c * size - OVERLAP : c * size]
            ids = lead_in + suffix + part
            inputs.append(ids or tokens[-1:])  # a row whose context is done still needs a real token in the pass
            bounds.append((starts[r] + c * size, starts[r] + c * size + len(part)))
        width = max(len(ids) for ids in inputs)
        ids = torch.full((b, width), pad, dtype=torch.long)
        mask = torch.zeros(b, width, dtype=torch.long)
        for r, row in enumerate(inputs):  # left padding, as in the prompt
            ids[r, width - len(row) :] = torch.tensor(row)
            mask[r, width - len(row) :] = 1
        device = input_ids.device
        cache.reconstructing = Chunk(bounds=torch.tensor(bounds, device=device), sink_end=lead.start + policy.sink)
        # uncompressed (sliding-window) layers cannot take tokens back: keep their state to restore it (their
        # updates concatenate into new tensors, so the old ones stay as they are)
        others = [layer for i, layer in enumerate(cache.layers) if i not in cache.compressed_layers]
        saved = [dict(vars(layer)) for layer in others]
        for layer in layers:
            layer.transient = True
        try:
            model(
                input_ids=ids.to(device),
                attention_mask=torch.cat([context_mask, mask], dim=1).to(device),
                **cache_kwargs(model, cache),
                use_cache=True,
                logits_to_keep=1,
            )
        finally:
            cache.reconstructing = None
            for layer in layers:
                layer.transient = False
            for layer, state in zip(others, saved):
                vars(layer).clear()
                vars(layer).update(state)


def layer_budgets(cache: Any) -> list[tuple[int, ...]]:
    """Per compressed layer, the per-head budget of every batch row: the policy's own for ``scope=layer``; for
    ``scope=model`` the layers' shares of one ranking of every layer and head of the row (the model-wide count is
    the policy's budget per layer and head summed over layers; a layer's share is rounded to whole tokens per head,
    so the total may differ by up to half a head's worth per layer)."""
    policy = cache.policy
    layers = [cache.layers[i] for i in cache.compressed_layers]
    own = [policy.budget_for(layer) for layer in layers]
    if policy.scorer().scope == "layer":
        return own
    prio = [policy.priorities(layer) for layer in layers]  # [B, H, n] per layer
    out = [list(budgets) for budgets in own]
    for r in range(len(own[0])):
        flat = torch.cat([p[r].reshape(-1) for p in prio])
        total = sum(budgets[r] * p.shape[1] for budgets, p in zip(own, prio))
        keep = top_mask(flat[None], min(total, flat.numel()))[0]
        offset = 0
        for i, p in enumerate(prio):
            size = p[r].numel()
            count = int(keep[offset : offset + size].sum())
            offset += size
            layer = layers[i]
            out[i][r] = min(max(round(count / p.shape[1]), policy.min_budget()), layer.context_lengths[r])
    return [tuple(budgets) for budgets in out]


def cut(cache: Any) -> None:
    """Cut every compressed layer of a scored cache to its budgets (``layer_budgets``), batched as usual."""
    layers = [cache.layers[i] for i in cache.compressed_layers]
    for layer, budgets in zip(layers, layer_budgets(cache)):
        if layer.max_count > max(budgets):
            cache.queue_eviction(layer, budgets, short_pass=False)
    cache.evict_pending()


def share_scores(source: Any, targets: list[Any]) -> None:
    """Copy the reconstruction scores of ``source`` into caches holding the same uncut prompt in the same slots
    (``fork.prefill_forks``: several budgets of one scoring run the reconstruction once)."""
    for target in targets:
        for i in source.compressed_layers:
            target.layers[i].set_state(SCORE, source.layers[i].state[SCORE].clone())


def reconstruct(model: Any, cache: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
    """Score the prompt by reconstruction, then cut."""
    score(model, cache, input_ids, attention_mask)
    cut(cache)
