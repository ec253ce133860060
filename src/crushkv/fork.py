"""One prompt forward, many compressed caches: ``prefill_forks`` for sweeps over policies.

A prompt's forward does not depend on the policy: every compressed layer attends over the whole prompt and only
cuts afterwards, so the hidden states, queries, keys and values of every layer are the same for every policy, as
long as the attention output is computed the same way. ``FanOut`` therefore runs the model once over the prompt and,
at each compressed layer, computes the output once and then each policy's own statistics, state and eviction in
its own ``CrushCache`` (each holding its own copy of the layer's K/V). The caches that come out are the ones
separate runs produce, bit for bit (``tests/test_fork.py``), and continue independently (question, decoding).

The output of a prompt pass comes from one of ``attention_math.output_path``'s computations, chosen by what the
policy asks: H2O-style column sums over every row use the exact prompt pass, everything else SDPA. The two round
differently, so policies are grouped by path and each group gets its own forward: a sweep costs one prompt forward
per path present (at most two), not one per policy.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache

from crushkv import reconstruct
from crushkv.api import cache_kwargs, installed, new_cache
from crushkv.attention_math import EXACT, FLASH, attend, attend_stats, output_path
from crushkv.cache import CrushCache
from crushkv.layer import CompressedLayer
from crushkv.policies import Policy, parse_policy
from crushkv.stats import ALL_ROWS, Stats, StatsRequest


def prompt_path(policy: Policy, length: int) -> str:
    """The output path of ``policy``'s prompt pass over an unpadded ``length``-token prompt (what groups share)."""
    request = policy.request(True, length) if policy.compresses else None
    return output_path(request, True, length, length)


class _Group(Cache):
    """A cache made of ``CrushCache``s (``caches``): transformers sees the first one's layers (lengths, masks), and
    installing the group activates them all."""

    def __init__(self, caches: Sequence[CrushCache]) -> None:
        if not caches:
            raise ValueError(f"{type(self).__name__} needs at least one cache")
        self.caches = list(caches)
        super().__init__(layers=self.caches[0].layers)
        self.active = False
        self.foreign_cache_warned = False

    @property
    def active(self) -> bool:
        return self._active

    @active.setter
    def active(self, value: bool) -> None:
        self._active = value
        for cache in getattr(self, "caches", ()):
            cache.active = value


class FanOut(_Group):
    """The cache of one prompt forward shared by several ``CrushCache``s whose prompt passes take the same output
    path; every cache gets each layer's K/V."""

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        for cache in self.caches[1:]:  # each store owns (and later writes into) its own copy
            cache.update(key_states.clone(), value_states.clone(), layer_idx, *args, **kwargs)
        return self.caches[0].update(key_states, value_states, layer_idx, *args, **kwargs)

    def run_attention(
        self, layer: CompressedLayer, query: torch.Tensor, attention_mask, scaling: float, position_ids=None
    ) -> torch.Tensor:
        """The output once, then each cache's statistics, policy state and eviction (``CrushCache.end_pass``)."""
        index = layer.layer_idx
        plans = [cache.begin_pass(cache.layers[index], query, attention_mask) for cache in self.caches]
        keys, values = layer.attention_inputs(True)
        length = keys.shape[2]
        paths = {output_path(p.request if p.active else None, p.visibility.plain, p.q, length) for p in plans}
        if not all(p.first for p in plans) or len(paths) != 1:
            raise ValueError(f"FanOut shares one prompt pass; got paths {sorted(paths)} (group by prompt_path)")
        lead = plans[0]
        if paths == {FLASH}:
            out, _ = attend(query, keys, values, lead.visibility, lead.row_valid, scaling, None)
            # every policy's statistics before any eviction: a cut compacts the first cache's store, which
            # ``keys``/``values`` view
            computed: dict[tuple, Stats] = {}
            for plan in plans:
                request = plan.request if plan.active else None
                if _request_key(request) not in computed:
                    stats = attend_stats(query, keys, values, lead.visibility, lead.row_valid, scaling, request)
                    computed[_request_key(request)] = stats
            for cache, plan in zip(self.caches, plans):
                stats = _copy(computed[_request_key(plan.request if plan.active else None)])
                cache.end_pass(cache.layers[index], plan, query, stats, position_ids)
            return out
        # exact or chunked: every request asks column sums over all rows; one pass with the union of the flags
        requests = [p.request for p in plans]
        union = StatsRequest(
            rows=ALL_ROWS,
            last=any(r.last for r in requests),
            count=any(r.count for r in requests),
            stride=1 if paths == {EXACT} else requests[0].stride,
        )  # ``queries`` is handed over per cache by ``end_pass``
        out, shared = attend(query, keys, values, lead.visibility, lead.row_valid, scaling, union)
        for cache, plan in zip(self.caches, plans):
            stats = _copy(shared)
            stats.last = stats.last if plan.request.last else None
            stats.count = stats.count if plan.request.count else None
            cache.end_pass(cache.layers[index], plan, query, stats, position_ids)
        return out


def _request_key(request: StatsRequest | None) -> tuple:
    return () if request is None else (request.rows, request.last, request.count, request.stride)


def _copy(stats: Stats) -> Stats:
    """Each policy gets its own ``Stats`` (``end_pass`` attaches per-cache tensors) over cloned tensors."""
    fields = {f.name: getattr(stats, f.name) for f in dataclasses.fields(stats)}
    return Stats(**{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in fields.items()})


def scoring_key(policy: Policy) -> tuple:
    """What a reconstruction's scores depend on (not the budget): caches with equal keys share one reconstruction."""
    host = policy.scorer()
    return (host.name, host.sink, host.chunk, host.prompt)


@torch.no_grad()  # not inference_mode: the caches are written to later, outside it
def prefill_forks(
    model,
    policies: Sequence[str | Policy],
    input_ids: torch.Tensor,
    defer_bytes: int | None = None,
    tokenizer=None,
) -> tuple[list[CrushCache], dict[str, float]]:
    """One ``CrushCache`` per policy holding the compressed prompt ``input_ids`` (``[1, L]``, no padding), from one
    model forward per output path (``prompt_path``). Continue each with ``crushkv.compress(model, cache=cache)``.
    Policies scored by reconstruction (``kvzip``) share the prompt forward too, and one reconstruction per
    ``scoring_key`` (several budgets of one method cost one); ``tokenizer`` as for ``crushkv.compress``.

    Returns the caches (in the order of ``policies``) and timings: ``prefill_s`` (all forwards), ``forwards``
    (prompt forwards), ``reconstructions``.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"prefill_forks takes one unpadded prompt [1, L], got shape {tuple(input_ids.shape)}")
    length = input_ids.shape[1]
    if length < 2:
        raise ValueError("prefill_forks needs a prompt of at least 2 tokens")
    parsed = [parse_policy(p) for p in policies]
    caches = [new_cache(model, p, defer_bytes, tokenizer) for p in parsed]
    groups: dict[str, list[CrushCache]] = {}
    for policy, cache in zip(parsed, caches):
        groups.setdefault(prompt_path(policy, length), []).append(cache)
    ids = input_ids.to(model.device)
    mask = torch.ones_like(ids)
    t0 = time.perf_counter()
    for members in groups.values():
        fan = FanOut(members)
        with installed(model, fan):
            model(ids, attention_mask=mask, **cache_kwargs(model, fan), use_cache=True, logits_to_keep=1)
    scored: dict[tuple, list[CrushCache]] = {}
    for cache in caches:
        if cache.reconstruct_due:
            cache.reconstruct_due = False
            scored.setdefault(scoring_key(cache.policy), []).append(cache)
    for lead, *others in scored.values():
        with installed(model, lead):
            reconstruct.score(model, lead, ids, mask)
        reconstruct.share_scores(lead, others)
        for cache in (lead, *others):
            reconstruct.cut(cache)
    timing = {"prefill_s": time.perf_counter() - t0, "forwards": len(groups), "reconstructions": len(scored)}
    return caches, timing


class StackedRows(_Group):
    """Several batch-1 ``CrushCache``s (forks of one prompt, any policies and stores) decoded as the rows of one
    batch: the model's weights are read once per step for all of them, which is what a CPU decode step costs, while
    each row's attention, statistics and eviction run in its own cache exactly as they would alone (row ``r`` gets
    row ``r`` of every pass's keys, values, queries and mask). ``rows`` may shrink between passes (finished rows
    leave, inactive); every row holds the same logical length, so transformers reads lengths and mask sizes off the
    first."""

    def __init__(self, caches: Sequence[CrushCache]) -> None:
        for cache in caches:
            if not isinstance(cache, CrushCache):
                raise TypeError(f"StackedRows stacks CrushCaches, got {type(cache).__name__}")
            rows = {layer.valid.shape[0] for layer in cache.layers if isinstance(layer, CompressedLayer)}
            if rows - {1}:
                raise ValueError(f"StackedRows stacks batch-1 caches; one holds {sorted(rows)} rows")
        lengths = {cache.get_seq_length() for cache in caches}
        if len(lengths) > 1:
            raise ValueError(f"StackedRows needs caches of one prompt length, got {sorted(lengths)}")
        super().__init__(caches)

    @property
    def rows(self) -> list[CrushCache]:
        return self.caches

    @rows.setter
    def rows(self, caches: Sequence[CrushCache]) -> None:
        if not caches:
            raise ValueError("StackedRows needs at least one row")
        for cache in self.caches:
            if cache not in caches:
                cache.active = False
        self.caches = list(caches)
        self.layers = self.caches[0].layers

    def _row(self, tensor, r: int):
        return tensor if tensor is None or tensor.shape[0] == 1 else tensor[r : r + 1]

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if key_states.shape[0] != len(self.rows):
            raise ValueError(f"a pass of {key_states.shape[0]} rows for {len(self.rows)} stacked caches")
        outs = [
            cache.update(key_states[r : r + 1], value_states[r : r + 1], layer_idx, *args, **kwargs)
            for r, cache in enumerate(self.rows)
        ]
        if isinstance(self.layers[layer_idx], CompressedLayer):
            return outs[0]  # crushkv's attention function recognises the first row's pass and calls run_attention
        return torch.cat([k for k, _ in outs]), torch.cat([v for _, v in outs])  # uncompressed (sliding) layers

    def run_attention(
        self, layer: CompressedLayer, query: torch.Tensor, attention_mask, scaling: float, position_ids=None
    ) -> torch.Tensor:
        index = layer.layer_idx
        outs = [
            cache.run_attention(
                cache.layers[index],
                query[r : r + 1],
                self._row(attention_mask, r),
                scaling,
                self._row(position_ids, r),
            )
            for r, cache in enumerate(self.rows)
        ]
        return torch.cat(outs)
