"""``<host>+kvcrush``: KVCrush (Jha et al., arXiv 2503.00022) on top of any host importance policy.

The total budget is split between the host ("hh") and KVCrush ("cl"). The host keeps its ``budget - crush`` best
slots (sink and recent included); KVCrush then keeps ``crush`` representatives of the slots the host would evict:
every token gets a binary head-behaviour signature (per head: is it in the top half of that head's scores?), the
evicted candidates are sorted by Hamming distance to an anchor and one representative per equal-size bucket is kept.

``granularity=block`` is OpenVINO GenAI's paged variant: the host keeps whole blocks, a block's signature is one bit
per token (top half by layer score), and KVCrush keeps whole representative blocks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from crushkv import kernels
from crushkv.crush import (
    ANCHORS,
    PICK_RULES,
    hamming,
    indicators,
    make_anchor,
    pick_representatives,
    ragged_quota,
    representative_mask,
)
from crushkv.policies.base import Wrapper, resolve_budget
from crushkv.profiling import PROFILER
from crushkv.quant import BITS
from crushkv.selection import forced_mask, priority, to_mask, top_mask
from crushkv.view import LayerView

GRANULARITIES = ("token", "block")


@dataclass
class KVCrush(Wrapper):
    """KVCrush wrapper. ``crush``: tokens (int) or fraction of the budget (float) given to representatives.

    ``additive=true`` adds the KVCrush share on top of the host budget instead (OpenVINO GenAI parity, where
    ``KVCrushConfig.budget`` is extra memory). ``pick``: representative rule (``bucket`` = first of each equal-size
    bucket, ``ovg`` = OpenVINO's ``i*floor(M/k)``, ``linspace`` = vLLM/OV-contrib). ``seed`` seeds the random anchor.
    KVCrush cuts at every decoding step by default (OpenVINO GenAI's schedule), whatever its host's default.
    """

    name: ClassVar[str] = "kvcrush"
    default_phase: ClassVar[str] = "decode"
    default_phase_override: ClassVar[bool] = True

    crush: int | float = 0.25
    anchor: str = "random"
    granularity: str = "token"
    block: int = 32
    additive: bool = False
    pick: str = "bucket"
    seed: int = 0
    #: ``full``: representatives stay in the layer's store like the host's tokens; ``int8|int4|int2``: they are
    #: kept in the layer's low-precision tier (``crushkv.stores.tier``) while the host's tokens stay at full precision
    reps: str = field(default="full", metadata={"omit_default": True})

    def validate(self) -> None:
        super().validate()
        if self.anchor not in ANCHORS:
            raise ValueError(f"kvcrush: unknown anchor {self.anchor!r}; valid anchors: {', '.join(ANCHORS)}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"kvcrush: granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.granularity == "block" and self.host.ragged:
            raise ValueError("kvcrush: granularity=block keeps whole blocks for all heads; it cannot wrap +adakv")
        if self.pick not in PICK_RULES:
            raise ValueError(f"kvcrush: pick must be one of {PICK_RULES}, got {self.pick!r}")
        if self.block < 1:
            raise ValueError("kvcrush: block must be >= 1")
        if isinstance(self.crush, bool) or not isinstance(self.crush, (int, float)):
            raise ValueError(f"kvcrush: crush must be tokens (int) or a fraction (float), got {self.crush!r}")
        if isinstance(self.crush, float) and not 0.0 <= self.crush < 1.0:
            raise ValueError(f"kvcrush: a float crush is a fraction of the budget in [0, 1), got {self.crush}")
        if isinstance(self.crush, int) and self.crush < 0:
            raise ValueError("kvcrush: crush must be >= 0")
        self._validate_reps()
        budget = self.host.budget
        if isinstance(budget, int) and not self.additive:
            host_share = budget - self.crush_tokens(budget)
            if host_share < self.host.min_budget():
                raise ValueError(
                    f"kvcrush: budget={budget} minus crush={self.crush_tokens(budget)} leaves {host_share} tokens for "
                    f"{self.host.name}, fewer than its sink+recent={self.host.min_budget()}"
                )

    def _validate_reps(self) -> None:
        if self.reps == "full":
            return
        if self.reps not in BITS:
            raise ValueError(f"kvcrush: reps must be full|{'|'.join(BITS)}, got {self.reps!r}")
        if self.host.tier != "drop":
            raise ValueError(
                f"kvcrush: reps={self.reps} puts the representatives in the low-precision tier; tier={self.host.tier} "
                "already puts every evicted token there (choose one)"
            )
        if self.host.phase != "prefill":
            raise ValueError(
                f"kvcrush: reps={self.reps} needs phase=prefill: the low-precision tier is append-only, so "
                "representatives picked at every cut would pile up past the budget"
            )
        if self.granularity != "token":
            raise ValueError(f"kvcrush: reps={self.reps} needs granularity=token")

    def low_precision(self) -> str:
        return self.host.low_precision() if self.reps == "full" else self.reps

    @property
    def batchable(self) -> bool:  # type: ignore[override]
        return self.host.batchable and self.granularity == "token"

    @property
    def shared(self) -> bool:  # type: ignore[override]
        return self.host.shared or self.granularity == "block"

    def notes(self) -> list[str]:
        notes = self.host.notes()
        inner = self.host
        while isinstance(inner, Wrapper):
            inner = inner.host
        if getattr(inner, "phase_from_wrapper", False):
            notes.append(
                f"{inner.name}+kvcrush runs at phase={inner.phase} (KVCrush's default, cut at every step); "
                f"{inner.name} alone defaults to phase={inner.default_phase}: set phase= to choose"
            )
        return notes

    def crush_tokens(self, budget: int) -> int:
        """Representative tokens for a layer whose (host or total) budget is ``budget``."""
        return self.crush if isinstance(self.crush, int) else round(self.crush * budget)

    def _nominal(self, view: LayerView) -> int:
        return resolve_budget(self.host.budget, view.context_lengths[0], self.host.min_budget())

    def budget_for(self, view: LayerView) -> tuple[int, ...]:
        budgets = self.host.budget_for(view)
        if not self.additive:
            return budgets
        return tuple(b + self.crush_tokens(b) for b in budgets)

    def split(self, view: LayerView, budget: int) -> tuple[int, int]:
        """(host tokens, KVCrush tokens) of a row budget ``budget``; the host keeps at least its sink + recent."""
        nominal = self._nominal(view)
        crush = self.crush_tokens(nominal)
        if self.additive:
            return budget - crush, crush
        if budget != nominal:  # layer-wise budgets (PyramidKV): KVCrush keeps the same share of each layer
            crush = round(crush * budget / nominal)
        crush = max(0, min(crush, budget - self.host.min_budget()))  # short prompts: the host's floor comes first
        return budget - crush, crush

    # ------------------------------------------------------------------ selection
    def keep_mask(self, view: LayerView, budget: int) -> torch.Tensor:
        host_mask, reps = self._host_and_reps(view, budget)
        return host_mask if reps is None else host_mask | reps

    def keep_and_demote(self, view: LayerView, budget: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.reps == "full":
            return self.keep_mask(view, budget), None
        host_mask, reps = self._host_and_reps(view, budget)
        return host_mask, torch.zeros_like(host_mask) if reps is None else reps

    def _host_and_reps(self, view: LayerView, budget: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        host_tokens, crush_tokens = self.split(view, budget)
        if self.granularity == "block":
            with PROFILER.section("kvcrush"):
                return self._select_blocks(view, host_tokens, crush_tokens), None
        host_mask = self.host.keep_mask(view, host_tokens)
        if crush_tokens == 0:
            return host_mask, None
        with PROFILER.section("kvcrush"):
            return host_mask, self._representatives(view, host_mask, crush_tokens)

    def _representatives(self, view: LayerView, host_mask: torch.Tensor, crush_tokens: int) -> torch.Tensor:
        """Signatures, anchor, Hamming distances and bucket picks among the host's evicted slots."""
        heads = 1 if self.host.shared else view.num_kv_heads
        valid, positions = view.valid[:, :heads], view.positions[:, :heads]
        order = None if view.order is None else view.order[:, :heads]
        host_mask = host_mask[:, :heads]
        scores = self.host.head_scores(view)  # [B, Hk or 1, G, n]
        per_slot = view.aligned or heads == 1  # every KV head holds the same token in each slot
        ragged = self.host.ragged and heads > 1
        op = kernels.kvcrush_reps() if scores.device.type == "cpu" and not ragged else None
        if op is not None and scores.shape[1] * scores.shape[2] <= 64:  # signatures fit one 64-bit word
            reps = self._compiled(op, view, scores, host_mask, crush_tokens, heads, per_slot)
            return reps.expand(-1, view.num_kv_heads, -1) if heads == 1 else reps
        forced = forced_mask(positions, valid, view.start, view.seen, self.sink, self.recent)
        region = valid & ~forced
        if per_slot:
            signatures = self._signatures(view, scores, region[:, :1])  # [B, 1, n, S]: one signature per slot
            distance = hamming(signatures, self._anchor(view, signatures, region[:, :1])).expand_as(region)
        else:
            distance = self._distances_by_position(view, scores, region)
        candidates = region & ~host_mask
        if ragged:  # a head the host kept whole passes its share on (no padding to fill)
            quota = ragged_quota(candidates.sum(-1), crush_tokens)
            return representative_mask(distance, candidates, quota, self.pick, order=order)
        reps = representative_mask(distance, candidates, crush_tokens, self.pick, fillers=~host_mask, order=order)
        reps &= valid  # rows with fewer candidates than ``crush`` were filled with free slots
        return reps.expand(-1, view.num_kv_heads, -1) if heads == 1 else reps

    def _compiled(self, op, view, scores, host_mask, crush_tokens: int, heads: int, per_slot: bool) -> torch.Tensor:
        """``_representatives`` as one call of the compiled ``crushkv.kvcrush_reps`` (same picks, ties included):
        the ~30 small ops of the op path cost more than the selection itself at decode-time sizes."""
        valid, positions = view.valid[:, :heads], view.positions[:, :heads]
        b, n = scores.shape[0], scores.shape[-1]
        width = scores.shape[1] * scores.shape[2]
        anchor = valid.new_empty(0)  # empty: the kernel computes each row's majority ("mean")
        if self.anchor != "mean":
            anchor = self._anchor(view, valid.new_zeros(b, 1, 1, width), valid)[:, 0]
        order = view.order
        return op(
            *(_last_dim_contiguous(t) for t in (scores.float().reshape(b, width, n), valid, positions)),
            view.start.long().contiguous(),
            view.seen,
            self.sink,
            self.recent,
            _last_dim_contiguous(host_mask),
            positions.new_empty(0) if order is None else _last_dim_contiguous(order[:, :heads]),
            anchor,
            1 if per_slot else heads,
            crush_tokens,
            PICK_RULES.index(self.pick),
        )

    def _signatures(self, view: LayerView, scores: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
        """``[B, 1, n, S]`` per-slot bits, one per query head: is the token in the top half of that head's scores?
        (Every KV head holds the same token in each slot.)"""
        b, hk, g, n = scores.shape
        order = view.order
        bits = indicators(scores.reshape(b, hk * g, n), region, None if order is None else order[:, :1])
        return bits.transpose(-1, -2)[:, None]

    def _distances_by_position(self, view: LayerView, scores: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
        """``[B, kv_heads, n]`` Hamming distances when the KV heads hold different tokens in a slot (per-head
        eviction): a token's signature has one bit per query head, read where that head holds the token (0 where it
        evicted it), so the bits are collected by position, ``table[b, s, position]``. Distances to each head's
        anchor are then two small matmuls, ``|t| + |a| - 2 a.t``, without a per-(head, slot, bit) tensor."""
        b, hk, g, n = scores.shape
        order = view.order
        bits = indicators(scores, region[:, :, None], None if order is None else order[:, :, None])
        seen = view.seen
        at = torch.where(region, view.positions, seen)  # region tokens by position, the rest into a spare column
        table = scores.new_zeros(b, hk * g, seen + 1, dtype=torch.float32)
        table.scatter_(-1, at[:, :, None].expand(b, hk, g, n).reshape(b, hk * g, n), bits.reshape(b, hk * g, n).float())
        table[..., seen] = 0
        members = torch.zeros(b, hk, seen + 1, device=table.device).scatter_(-1, at, 1.0)
        members[..., seen] = 0
        if self.anchor == "mean":  # each head's majority bit over the tokens of its own region
            ones = torch.bmm(members, table.transpose(1, 2))  # [B, Hk, S]
            anchor = (ones * 2 > members.sum(-1, keepdim=True)).float()
        else:
            anchor = self._anchor(view, table.new_zeros(b, 1, 1, hk * g, dtype=torch.bool), members[:, :1]).float()
            anchor = anchor.expand(b, hk, hk * g)
        distance = table.sum(1, keepdim=True) + anchor.sum(-1, keepdim=True) - 2 * torch.bmm(anchor, table)
        return distance.gather(-1, at).round_().long()

    def _anchor(self, view: LayerView, signatures: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
        """``[B, heads, S]`` anchor for ``[B, heads, n, S]`` signatures."""
        if self.anchor != "random":
            return make_anchor(self.anchor, signatures, members)
        width = signatures.shape[-1]

        def draw(layer_idx: int) -> torch.Tensor:  # fixed per (seed, layer, width): stable across decoding steps
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + layer_idx)
            return make_anchor("random", signatures[:1, 0, :1], generator=generator)[0]

        anchors = view.per_layer(("kvcrush_anchor", self.seed, width), draw)  # [B, S], one anchor per layer
        if signatures.shape[0] != anchors.shape[0]:  # one batch row's blocks (block granularity)
            anchors = anchors[:1]
        return anchors[:, None].expand(*signatures.shape[:2], width)

    # ------------------------------------------------------------------ block granularity (OpenVINO GenAI's)
    def _select_blocks(self, view: LayerView, host_tokens: int, crush_tokens: int) -> torch.Tensor:
        """Block choice per batch row, topped up to the exact budget with the best remaining tokens."""
        valid, positions = view.valid[:, 0], view.positions[:, 0]
        order = None if view.order is None else view.order[:, 0]
        forced = forced_mask(positions, valid, view.start, view.seen, self.sink, self.recent)
        token_scores = self.host.head_scores(view).float().mean((1, 2))  # [B, n] layer-level score
        region = valid & ~forced
        rows = []
        for b in range(valid.shape[0]):
            row_order = None if order is None else order[b]
            chosen = forced[b] | self._block_choice(
                view, token_scores[b], region[b], forced[b], host_tokens, crush_tokens, row_order
            )
            prio = priority(token_scores[b], chosen, valid[b])
            rows.append(top_mask(prio, host_tokens + crush_tokens, row_order) & valid[b])
        return torch.stack(rows)[:, None].expand(-1, view.num_kv_heads, -1)

    def _block_choice(
        self,
        view: LayerView,
        scores: torch.Tensor,
        region: torch.Tensor,
        forced: torch.Tensor,
        host_tokens: int,
        crush_tokens: int,
        order: torch.Tensor | None,
    ) -> torch.Tensor:
        """Mask of slots in the host's blocks and KVCrush's representative blocks (one batch row).

        A block is ``block`` consecutive region tokens in sequence order.
        """
        slots = region.nonzero().squeeze(1)
        if order is not None:
            slots = slots[order[slots].argsort()]
        n_blocks = slots.numel() // self.block
        chosen = torch.zeros_like(region)
        if n_blocks == 0:
            return chosen
        blocks = slots[: n_blocks * self.block].view(n_blocks, self.block)
        n_host = min(n_blocks, max(0, host_tokens - int(forced.sum())) // self.block)
        n_rep = min(n_blocks - n_host, crush_tokens // self.block)
        block_scores = scores[blocks].sum(-1)
        host_blocks = top_mask(block_scores, n_host)
        signatures = indicators(scores, region, order)[blocks]  # [n_blocks, block]: top half of the row, per token
        members = torch.ones(1, 1, n_blocks, dtype=torch.bool, device=region.device)
        anchor = self._anchor(view, signatures[None, None], members)[0, 0]
        distance = hamming(signatures[None], anchor[None])[0]
        reps = pick_representatives(distance[None], ~host_blocks[None], n_rep, self.pick)[0]
        picked = host_blocks | to_mask(reps, n_blocks)
        chosen[blocks[picked].flatten()] = True
        return chosen


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` as the kernel reads it: any strides but the last (sliced and expanded views pass without a copy)."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


KVCRUSH_FIELDS = tuple(f.name for f in dataclasses.fields(KVCrush) if f.name != "host")
