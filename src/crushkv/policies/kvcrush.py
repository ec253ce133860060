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
from dataclasses import dataclass
from typing import ClassVar

import torch

from crushkv.crush import (
    ANCHORS,
    PICK_RULES,
    hamming,
    indicators,
    make_anchor,
    pick_representatives,
    representative_mask,
    token_signatures,
)
from crushkv.layer_stack import members as stacked_layers
from crushkv.policies.base import Policy, Stats, StatsRequest, format_fields, resolve_budget
from crushkv.profiling import PROFILER
from crushkv.selection import forced_mask, mask_to_indices, priority, to_mask, top_mask, topk_slots

GRANULARITIES = ("token", "block")


@dataclass
class KVCrush:
    """KVCrush wrapper. ``crush``: tokens (int) or fraction of the budget (float) given to representatives.

    ``additive=true`` adds the KVCrush share on top of the host budget instead (OpenVINO GenAI parity, where
    ``KVCrushConfig.budget`` is extra memory). ``pick``: representative rule (``bucket`` = first of each equal-size
    bucket, ``ovg`` = OpenVINO's ``i*floor(M/k)``, ``linspace`` = vLLM/OV-contrib). ``seed`` seeds the random anchor.
    """

    name: ClassVar[str] = "kvcrush"
    compresses: ClassVar[bool] = True

    host: Policy
    crush: int | float = 0.25
    anchor: str = "random"
    granularity: str = "token"
    block: int = 32
    additive: bool = False
    pick: str = "bucket"
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.host, Policy) or not self.host.compresses:
            raise ValueError("kvcrush wraps a compressing host policy, e.g. h2o+kvcrush or snapkv+kvcrush")
        if self.anchor not in ANCHORS:
            raise ValueError(f"kvcrush: unknown anchor {self.anchor!r}; valid anchors: {', '.join(ANCHORS)}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"kvcrush: granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
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
        budget = self.host.budget
        if isinstance(budget, int) and not self.additive:
            host_share = budget - self.crush_tokens(budget)
            if host_share < self.host.min_budget():
                raise ValueError(
                    f"kvcrush: budget={budget} minus crush={self.crush_tokens(budget)} leaves {host_share} tokens for "
                    f"{self.host.name}, fewer than its sink+recent={self.host.min_budget()}"
                )

    # ------------------------------------------------------------------ delegated configuration
    @property
    def phase(self) -> str:
        return self.host.phase

    @property
    def budget(self) -> int | float | None:
        return self.host.budget

    @property
    def interval(self) -> int | str:
        return self.host.interval

    def interval_for(self, budget: int) -> int:
        return self.host.interval_for(budget)

    @property
    def batchable(self) -> bool:
        return self.host.batchable and self.granularity == "token"

    @property
    def shared(self) -> bool:
        return self.host.shared or self.granularity == "block"

    def min_budget(self) -> int:
        return self.host.min_budget()

    @property
    def spec(self) -> str:
        own = format_fields(self, skip=("host",))
        return f"{self.host.name}+kvcrush:{format_fields(self.host)},{own}"

    def crush_tokens(self, budget: int) -> int:
        """Representative tokens for a layer whose (host or total) budget is ``budget``."""
        return self.crush if isinstance(self.crush, int) else round(self.crush * budget)

    def split(self, layer) -> tuple[int, int]:
        """(host tokens, KVCrush tokens) for this layer."""
        budget = self.host.budget_for(layer)
        nominal = resolve_budget(self.host.budget, layer.context_length, self.host.min_budget(), self.host.name)
        crush = self.crush_tokens(nominal)
        if self.additive:
            return budget, crush
        if budget != nominal:
            # layer-wise budgets (PyramidKV): KVCrush keeps the same share of each layer, within what the layer has
            crush = min(round(crush * budget / nominal), budget - self.host.min_budget())
        if budget - crush < self.host.min_budget():
            raise ValueError(
                f"kvcrush: layer budget {budget} minus crush {crush} is below sink+recent={self.host.min_budget()}"
            )
        return budget - crush, crush

    # ------------------------------------------------------------------ runtime hooks (host does the scoring)
    def request(self, first: bool, q_len: int) -> StatsRequest:
        return self.host.request(first, q_len)

    def observe(self, layer, stats: Stats, first: bool) -> None:
        self.host.observe(layer, stats, first)

    def budget_for(self, layer) -> int:
        return sum(self.split(layer))

    def select(self, layer, budget: int) -> torch.Tensor:
        host_tokens, crush_tokens = self.split(layer)
        if self.granularity == "block":
            return self._select_blocks(layer, host_tokens, crush_tokens)
        return self._select_tokens(layer, host_tokens, crush_tokens)

    # ------------------------------------------------------------------ token granularity (the paper's)
    def _select_tokens(self, layer, host_tokens: int, crush_tokens: int) -> torch.Tensor:
        host = self.host
        valid = layer.valid[:, 0]  # [B, L], identical across heads
        forced = forced_mask(valid, host.sink, host.recent)
        host_scores = host.host_priority_scores(layer)  # [B, Hs, L]
        # the host's kept set as a mask: KVCrush works on masks, so no index round trip per decode step
        host_mask = top_mask(priority(host_scores, forced[:, None].expand_as(host_scores), valid[:, None]), host_tokens)
        with PROFILER.section("kvcrush"):
            return self._add_representatives(layer, host_mask, host_tokens, valid, forced, crush_tokens)

    def _add_representatives(
        self, layer, host_mask: torch.Tensor, host_tokens: int, valid, forced, crush_tokens: int
    ) -> torch.Tensor:
        """Signatures, anchor, Hamming distances and bucket picks among the host's evicted slots."""
        heads = host_mask.shape[1]
        region = valid & ~forced
        signature_scores = self.host.head_scores(layer).flatten(1, 2)  # one bit per (query) head
        signatures = token_signatures(signature_scores, region)  # [B, L, S]
        anchor = self._anchor(layer, signatures, region)
        distance = hamming(signatures, anchor)[:, None].expand(-1, heads, -1)
        candidates = region[:, None] & ~host_mask
        reps = representative_mask(distance, candidates, crush_tokens, self.pick, fillers=~host_mask)
        # representatives lie outside the host's set, so the union has exactly host + crush slots per row
        keep = mask_to_indices(host_mask | reps, host_tokens + crush_tokens)
        return keep.expand(-1, layer.num_heads, -1) if heads == 1 else keep

    # ------------------------------------------------------------------ block granularity (OpenVINO GenAI's)
    def _select_blocks(self, layer, host_tokens: int, crush_tokens: int) -> torch.Tensor:
        host = self.host
        valid = layer.valid[:, 0]
        forced = forced_mask(valid, host.sink, host.recent)
        token_scores = host.head_scores(layer).float().mean((1, 2))  # [B, L] layer-level score
        region = valid & ~forced
        with PROFILER.section("kvcrush"):
            return self._block_rows(layer, token_scores, valid, forced, region, host_tokens, crush_tokens)

    def _block_rows(self, layer, token_scores, valid, forced, region, host_tokens: int, crush_tokens: int):
        """Block choice per batch row, topped up to the exact budget with the best remaining tokens."""
        budget = host_tokens + crush_tokens
        rows = []
        for b in range(valid.shape[0]):
            chosen = forced[b] | self._block_choice(
                layer, token_scores[b], region[b], forced[b], host_tokens, crush_tokens
            )
            rows.append(topk_slots(priority(token_scores[b], chosen, valid[b]), budget))
        return torch.stack(rows)[:, None].expand(-1, layer.num_heads, -1)

    def _block_choice(
        self,
        layer,
        scores: torch.Tensor,
        region: torch.Tensor,
        forced: torch.Tensor,
        host_tokens: int,
        crush_tokens: int,
    ) -> torch.Tensor:
        """Mask of slots in the host's blocks and KVCrush's representative blocks (one batch row)."""
        slots = region.nonzero().squeeze(1)
        n_blocks = slots.numel() // self.block
        chosen = torch.zeros_like(region)
        if n_blocks == 0:
            return chosen
        blocks = slots[: n_blocks * self.block].view(n_blocks, self.block)
        n_host = min(n_blocks, max(0, host_tokens - int(forced.sum())) // self.block)
        n_rep = min(n_blocks - n_host, crush_tokens // self.block)
        block_scores = scores[blocks].sum(-1)
        host_blocks = topk_slots(block_scores, n_host)
        signatures = indicators(scores, region)[blocks]  # [n_blocks, block]
        anchor = self._anchor(layer, signatures[None], None)[0]
        distance = hamming(signatures[None], anchor[None])[0]
        candidates = ~to_mask(host_blocks, n_blocks)
        reps = pick_representatives(distance[None], candidates[None], n_rep, self.pick)[0]
        chosen[blocks[torch.cat([host_blocks, reps])].flatten()] = True
        return chosen

    def _anchor(self, layer, signatures: torch.Tensor, members: torch.Tensor | None) -> torch.Tensor:
        if self.anchor != "random":
            return make_anchor(self.anchor, signatures, members)
        # a fixed random anchor per (seed, layer, width): reproducible and stable across decoding steps
        key = ("kvcrush_anchor", signatures.shape[-1])
        layers = stacked_layers(layer)  # one anchor per stacked layer, each repeated over that layer's batch rows
        for one in layers:
            if key not in one.extras:
                one.extras[key] = make_anchor("random", signatures[:1, :1], generator=one.generator(self.seed))[0]
        anchors = torch.stack([one.extras[key] for one in layers])
        rows = signatures.shape[0] // len(layers) if signatures.dim() > 2 else 1
        return anchors.repeat_interleave(rows, 0).expand(*signatures.shape[:-2], -1)


KVCRUSH_FIELDS = tuple(f.name for f in dataclasses.fields(KVCrush) if f.name != "host")
