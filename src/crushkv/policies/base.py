"""The policy contract: what a compression method asks from the attention pass and how it ranks cache slots.

A policy never touches cache tensors. The cache layer calls, per layer and per forward pass:

1. ``request(first, q_len)``: which attention statistics to compute (none, some query rows, the last row);
2. ``observe(layer, stats, first)``: fold them into slot-aligned state (``layer.state``), e.g. H2O's running sums;
3. ``budget_for(layer)``: how many slots the layer may keep; if it holds more, ``select(layer, budget)`` returns the
   slot indices ``[B, kv_heads, budget]`` to keep and the layer gathers them (real memory is freed).

A new scoring method is one subclass overriding ``head_scores`` (and ``request``/``observe`` if it needs attention),
plus ``@register``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from crushkv.selection import select_topk

if TYPE_CHECKING:
    from crushkv.cache import CompressedLayer

PHASES = ("prefill", "decode")
ALL_ROWS = -1
#: prompt rows always scored exactly when a ``StatsRequest`` samples rows with ``stride > 1``
TAIL_ROWS = 64
#: ``interval=auto``: a layer with budget ``b`` is cut back every ``1 + b // AUTO_INTERVAL_DIVISOR`` decode tokens
AUTO = "auto"
AUTO_INTERVAL_DIVISOR = 64


@dataclass(frozen=True)
class StatsRequest:
    """Attention statistics a policy needs from one forward pass of a layer.

    ``rows``: ``None`` for no column sums, ``ALL_ROWS`` for every query row, ``w > 0`` for the last ``w`` rows.
    ``last``: also return the attention row of the last query.
    ``stride``: with ``ALL_ROWS`` on an unpadded causal prompt, estimate the column sums from every ``stride``-th
    query row (weighted by ``stride``) plus the last ``TAIL_ROWS`` rows exactly; 1 = exact.
    """

    rows: int | None = None
    last: bool = False
    stride: int = 1

    @property
    def empty(self) -> bool:
        return self.rows is None and not self.last


@dataclass
class Stats:
    """Statistics from one forward pass, slot-aligned with the layer after this pass's keys were appended.

    ``colsum``: ``[B, kv_heads, group, L]`` sum of attention probabilities over the requested (non-padding) rows,
    one entry per query head (grouped under its KV head). ``count``: ``[B, kv_heads, L]`` number of those rows that
    could see each slot. ``last``: ``[B, kv_heads, group, L]`` probabilities of the last query row.
    """

    colsum: torch.Tensor | None = None
    count: torch.Tensor | None = None
    last: torch.Tensor | None = None


REGISTRY: dict[str, type[Policy]] = {}


def register(cls: type[Policy]) -> type[Policy]:
    """Class decorator adding a policy to the name registry used by spec strings."""
    if cls.name in REGISTRY:
        raise ValueError(f"policy {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls


@dataclass
class Policy:
    """Base class of host (importance) policies.

    ``budget``: tokens kept per layer and KV head (int) or a fraction of the context length at the first
    compression (float in (0, 1]); it counts every kept token, sink and recent included.
    ``sink``: first tokens always kept. ``recent``: last tokens always kept.
    ``phase``: ``prefill`` compresses once after the prompt; ``decode`` cuts back to the budget after every forward.
    ``interval`` (decode phase): cut back only once ``interval`` tokens have been added since the last cut, so the
    cache holds at most ``budget + interval - 1`` tokens and the selection cost is paid once per ``interval`` steps.
    ``interval=auto`` scales it with the layer's budget, ``1 + budget // 64``: the cache never holds more than
    ``budget / 64`` (1.6 %) extra tokens, and long contexts (large budgets) select least often.
    """

    name: ClassVar[str] = ""
    default_phase: ClassVar[str] = "prefill"
    #: True when the kept set is shared by all heads of a layer (TOVA, StreamingLLM); False for per-KV-head selection
    shared: ClassVar[bool] = False
    #: False for ``full``: the policy never evicts and takes no budget
    compresses: ClassVar[bool] = True
    #: False when ``select`` depends on the layer itself (index, per-layer generator): no cross-layer batching
    batchable: ClassVar[bool] = True

    budget: int | float | None = None
    sink: int = 4
    recent: int = 32
    phase: str = ""
    interval: int | str = 1

    def __post_init__(self) -> None:
        if not self.phase:
            self.phase = self.default_phase
        self.validate()

    # ------------------------------------------------------------------ configuration
    def validate(self) -> None:
        """Raise ``ValueError`` for inconsistent settings (checked at construction)."""
        if self.phase not in PHASES:
            raise ValueError(f"{self.name}: phase must be one of {PHASES}, got {self.phase!r}")
        if self.sink < 0 or self.recent < 0:
            raise ValueError(f"{self.name}: sink and recent must be >= 0")
        if self.interval != AUTO and (
            isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1
        ):
            raise ValueError(f"{self.name}: interval must be an int >= 1 or '{AUTO}', got {self.interval!r}")
        if not self.compresses:
            return
        if self.budget is None:
            raise ValueError(f"{self.name}: a budget is required, e.g. {self.name}:budget=512 or budget=0.25")
        if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)):
            raise ValueError(f"{self.name}: budget must be an int (tokens) or a float ratio, got {self.budget!r}")
        if isinstance(self.budget, float) and not 0.0 < self.budget <= 1.0:
            raise ValueError(f"{self.name}: a float budget is a ratio of the context in (0, 1], got {self.budget}")
        if isinstance(self.budget, int) and self.budget < self.min_budget():
            raise ValueError(
                f"{self.name}: budget={self.budget} is smaller than sink+recent={self.min_budget()} "
                f"(sink={self.sink}, recent={self.recent}); raise the budget or lower sink/recent"
            )

    def interval_for(self, budget: int) -> int:
        """Decode tokens added between two cuts of a layer whose budget is ``budget`` (resolves ``auto``)."""
        return 1 + budget // AUTO_INTERVAL_DIVISOR if self.interval == AUTO else int(self.interval)

    def min_budget(self) -> int:
        """Smallest per-layer budget that still holds the always-kept tokens."""
        return self.sink + self.recent

    @property
    def spec(self) -> str:
        """Canonical spec string (every field, so result files are self-describing)."""
        return f"{self.name}:{format_fields(self)}" if self.compresses else self.name

    # ------------------------------------------------------------------ runtime hooks
    def request(self, first: bool, q_len: int) -> StatsRequest:
        """Statistics needed from this forward pass (``first``: the first pass of this cache, i.e. the prompt)."""
        return StatsRequest()

    def observe(self, layer: CompressedLayer, stats: Stats, first: bool) -> None:
        """Fold this pass's statistics into ``layer.state``."""

    def head_scores(self, layer: CompressedLayer) -> torch.Tensor:
        """Importance of every slot, ``[B, kv_heads, group, L]`` (``group`` may be 1): higher is kept first."""
        raise NotImplementedError

    def budget_for(self, layer: CompressedLayer) -> int:
        """Slots this layer may keep (resolves a ratio against the context length at the first compression)."""
        return resolve_budget(self.budget, layer.context_length, self.min_budget(), self.name)

    def host_priority_scores(self, layer: CompressedLayer) -> torch.Tensor:
        """Scores reduced to the selection granularity: ``[B, kv_heads, L]`` or ``[B, 1, L]`` when shared."""
        scores = self.head_scores(layer).float().mean(2)
        return scores.mean(1, keepdim=True) if self.shared else scores

    def select(self, layer: CompressedLayer, budget: int) -> torch.Tensor:
        """Slot indices ``[B, kv_heads, budget]`` to keep, ascending."""
        scores = self.host_priority_scores(layer)
        valid = layer.valid[:, : scores.shape[1]]
        keep = select_topk(scores, budget, valid, self.sink, self.recent)
        return keep.expand(-1, layer.num_heads, -1) if self.shared else keep


def resolve_budget(budget: int | float | None, context: int, floor: int, name: str) -> int:
    """Token budget for a layer: ints as is, ratios of ``context`` rounded, never below ``floor``."""
    if budget is None:
        raise ValueError(f"{name}: no budget")
    if isinstance(budget, float):
        tokens = round(budget * context)
        if tokens < floor:
            raise ValueError(
                f"{name}: budget={budget} of a {context}-token context is {tokens} tokens, fewer than the "
                f"{floor} always-kept sink+recent tokens; use a larger ratio or a longer context"
            )
        return tokens
    return int(budget)


def format_fields(obj: object, skip: tuple[str, ...] = ()) -> str:
    """``key=value`` pairs of a dataclass, in field order."""
    parts = []
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        if f.name in skip or not f.init:
            continue
        value = getattr(obj, f.name)
        if f.metadata.get("omit_default") and value == f.default:
            continue  # options added later stay out of canonical specs at their default: old results still match
        if isinstance(value, bool):
            value = str(value).lower()
        parts.append(f"{f.name}={value}")
    return ",".join(parts)
