"""The policy contract: what a compression method asks from the attention pass and how it ranks cache slots.

A policy reads a layer only through ``LayerView`` (``crushkv.view``). The cache calls, per layer and forward pass:

1. ``request(first, q_len)``: which attention statistics to compute (none, some query rows, the last row);
2. ``observe(layer, stats, first)``: fold them into slot-aligned state (``layer.accumulate`` / ``set_state``);
3. ``budget_for(view)``: how many slots each batch row may keep; if a row holds more, ``keep_mask(view, budget)``
   returns the boolean ``[B, kv_heads, n]`` mask of slots to keep and the layer frees the others.

Hosts (scoring methods) subclass ``Host``: a new one is one file overriding ``head_scores`` (and ``request`` /
``observe`` if it needs attention) with ``@register``, imported in ``policies/__init__.py``. Wrappers (KVCrush,
Ada-KV) subclass ``Wrapper`` and hold the policy they refine as ``host``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from crushkv.quant import QUANT_MODES, TIER_MODES
from crushkv.selection import forced_mask, priority, top_mask
from crushkv.stats import Stats, StatsRequest
from crushkv.stores import STORES
from crushkv.view import LayerView

PHASES = ("prefill", "decode")
#: ``interval=auto``: a layer with budget ``b`` is cut back every ``1 + b // AUTO_INTERVAL_DIVISOR`` decode tokens
AUTO = "auto"
AUTO_INTERVAL_DIVISOR = 64

REGISTRY: dict[str, type[Host]] = {}


def register(cls: type[Host]) -> type[Host]:
    """Class decorator adding a host policy to the name registry used by spec strings."""
    if cls.name in REGISTRY:
        raise ValueError(f"policy {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls


class Policy:
    """What the cache needs from any policy, host or wrapper (wrappers answer the configuration from their host).

    ``budget``: tokens kept per layer and KV head (int) or a fraction of each batch row's prompt (float in (0, 1]);
    it counts every kept token, sink and recent included. ``phase``: ``prefill`` cuts once after the prompt,
    ``decode`` after every forward (every ``interval`` tokens). ``store``: ``dense`` or ``paged`` (``page`` tokens per
    page). ``quant``: ``none`` or KIVI-style ``int8|int4|int2`` slots (keys per channel over ``group`` tokens, values
    per token over ``group`` channels, the newest ``residual`` tokens at full precision; ``crushkv.stores.quant``).
    ``tier``: ``drop`` (evicted tokens are freed) or ``int8|int4|int2``: evicted tokens are kept at that precision
    (keys per channel over ``group`` tier slots, the last incomplete group exact; values per token over ``group``
    channels) and still attended over (MiKV; ``crushkv.stores.tier``).
    """

    name: ClassVar[str] = ""
    default_phase: ClassVar[str] = "prefill"
    #: True when the kept set is shared by all heads of a layer (TOVA, StreamingLLM); False for per-KV-head selection
    shared: ClassVar[bool] = False
    #: False for ``full``: the policy never evicts and takes no budget
    compresses: ClassVar[bool] = True
    #: False when selection depends on the layer itself (index, per-layer generator): no cross-layer batching
    batchable: ClassVar[bool] = True
    #: True when per-head kept counts may differ (Ada-KV): a dense store pads to the largest head
    ragged: ClassVar[bool] = False
    #: the phases the policy can run in (one when its scores exist only once, e.g. KVzip's after the prompt)
    phases: ClassVar[tuple[str, ...]] = PHASES
    #: True when the prompt is scored by extra forward passes after it (KVzip's reconstruction, ``crushkv.reconstruct``)
    reconstructs: ClassVar[bool] = False

    budget: int | float | None
    sink: int
    recent: int
    phase: str
    interval: int | str
    store: str
    page: int
    quant: str
    group: int
    residual: int
    tier: str

    # ------------------------------------------------------------------ configuration
    def scorer(self) -> Policy:
        """The host under any wrappers: its settings drive passes beyond attention (KVzip's reconstruction)."""
        return self

    def interval_for(self, budget: int) -> int:
        """Decode tokens added between two cuts of a layer whose budget is ``budget`` (resolves ``auto``)."""
        return 1 + budget // AUTO_INTERVAL_DIVISOR if self.interval == AUTO else int(self.interval)

    def min_budget(self) -> int:
        """Smallest per-layer budget that still holds the always-kept tokens."""
        return self.sink + self.recent

    def with_default_phase(self, phase: str) -> Policy:
        """This policy with ``phase`` unless the user set one (a wrapper's default phase reaches its host)."""
        raise NotImplementedError

    @property
    def spec(self) -> str:
        """Canonical spec string (every field, so result files are self-describing)."""
        raise NotImplementedError

    def notes(self) -> list[str]:
        """Behaviour a user may not expect from the spec alone (shown by the CLI and the cache summary)."""
        notes = []
        if self.compresses and self.phase == "prefill":
            notes.append(
                "phase=prefill: the prompt is cut to the budget once; generated tokens are appended without "
                "eviction, so the cache grows past the budget (phase=decode keeps it at the budget)"
            )
        return notes

    # ------------------------------------------------------------------ runtime hooks
    def request(self, first: bool, q_len: int) -> StatsRequest:
        """Statistics needed from this forward pass (``first``: the first pass of this cache, i.e. the prompt)."""
        return StatsRequest()

    def observe(self, layer, stats: Stats, first: bool) -> None:
        """Fold this pass's statistics into the layer's state."""

    def head_scores(self, view: LayerView) -> torch.Tensor:
        """Importance of every slot, ``[B, kv_heads, group, n]`` (``group`` may be 1): higher is kept first."""
        raise NotImplementedError

    def host_priority_scores(self, view: LayerView) -> torch.Tensor:
        """Scores reduced to the selection granularity: ``[B, kv_heads, n]`` or ``[B, 1, n]`` when shared."""
        scores = self.head_scores(view).float().mean(2)
        return scores.mean(1, keepdim=True) if self.shared else scores

    def budget_for(self, view: LayerView) -> tuple[int, ...]:
        """Slots each batch row of ``view`` may keep (per KV head; ratios resolve against each row's prompt)."""
        return tuple(resolve_budget(self.budget, n, self.min_budget()) for n in view.context_lengths)

    def keep_mask(self, view: LayerView, budget: int) -> torch.Tensor:
        """Boolean ``[B, kv_heads, n]`` mask of the ``budget`` slots to keep per row (all valid ones if fewer)."""
        raise NotImplementedError

    def keep_and_demote(self, view: LayerView, budget: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The slots that stay at full precision, and those the cut moves into the layer's low-precision tier
        (``None``: every slot it frees, when the layer has a tier; KVCrush's ``reps=`` demotes its picks only)."""
        return self.keep_mask(view, budget), None

    def low_precision(self) -> str:
        """Precision of the layer's low tier (``drop``: none): ``tier=``, or ``+kvcrush``'s ``reps=``."""
        return self.tier


def resolve_budget(budget: int | float | None, context: int, floor: int) -> int:
    """Token budget of a layer: ints as is, ratios of ``context`` rounded and raised to ``floor`` (sink + recent).

    A prompt shorter than the always-kept tokens is therefore not compressed at all, whatever the ratio.
    """
    if budget is None:
        raise ValueError("no budget")
    if isinstance(budget, float):
        return max(round(budget * context), floor)
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


@dataclass
class Host(Policy):
    """Base class of host (importance) policies: the configuration fields every spec shares."""

    budget: int | float | None = None
    sink: int = 4
    recent: int = 32
    phase: str = ""
    interval: int | str = 1
    store: str = field(default="dense", metadata={"omit_default": True})
    page: int = field(default=16, metadata={"omit_default": True})
    quant: str = field(default="none", metadata={"omit_default": True})
    group: int = field(default=32, metadata={"omit_default": True})
    residual: int = field(default=128, metadata={"omit_default": True})
    tier: str = field(default="drop", metadata={"omit_default": True})

    def __post_init__(self) -> None:
        # not fields: equality and specs see the resolved phase only
        self.explicit_phase = bool(self.phase)
        self.phase_from_wrapper = False
        if not self.phase:
            self.phase = self.default_phase
        self.validate()

    def with_default_phase(self, phase: str) -> Policy:
        if self.explicit_phase:
            return self
        wrapped = dataclasses.replace(self, phase=phase)
        wrapped.explicit_phase, wrapped.phase_from_wrapper = False, phase != self.default_phase
        return wrapped

    def validate(self) -> None:
        """Raise ``ValueError`` for inconsistent settings (checked at construction)."""
        if self.phase not in self.phases:
            raise ValueError(f"{self.name}: phase must be one of {self.phases}, got {self.phase!r}")
        if self.sink < 0 or self.recent < 0:
            raise ValueError(f"{self.name}: sink and recent must be >= 0")
        if self.interval != AUTO and (
            isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1
        ):
            raise ValueError(f"{self.name}: interval must be an int >= 1 or '{AUTO}', got {self.interval!r}")
        if self.store not in STORES:
            raise ValueError(f"{self.name}: store must be one of {', '.join(STORES)}, got {self.store!r}")
        if isinstance(self.page, bool) or not isinstance(self.page, int) or self.page < 1:
            raise ValueError(f"{self.name}: page must be an int >= 1 (tokens per page), got {self.page!r}")
        self._validate_quant()
        if not self.compresses:
            if self.budget is not None:
                raise ValueError(f"{self.name} keeps every token and takes no budget; remove budget={self.budget}")
            return
        if self.budget is None:
            raise ValueError(f"{self.name}: a budget is required, e.g. {self.name}:budget=512 or budget=0.25")
        if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)):
            raise ValueError(f"{self.name}: budget must be an int (tokens) or a float ratio, got {self.budget!r}")
        if isinstance(self.budget, float) and not 0.0 < self.budget <= 1.0:
            raise ValueError(f"{self.name}: a float budget is a ratio of the context in (0, 1], got {self.budget}")
        if isinstance(self.budget, int) and self.budget < 1:
            raise ValueError(f"{self.name}: budget must be at least 1 token, got {self.budget}")
        if isinstance(self.budget, int) and self.budget < self.min_budget():
            raise ValueError(
                f"{self.name}: budget={self.budget} is smaller than sink+recent={self.min_budget()} "
                f"(sink={self.sink}, recent={self.recent}); raise the budget or lower sink/recent"
            )

    def _validate_quant(self) -> None:
        if self.quant not in QUANT_MODES:
            raise ValueError(f"{self.name}: quant must be one of {'|'.join(QUANT_MODES)}, got {self.quant!r}")
        for key, low in (("group", 1), ("residual", 0)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{self.name}: {key} must be an int >= {low}, got {value!r}")
        if self.tier not in TIER_MODES:
            raise ValueError(f"{self.name}: tier must be one of {'|'.join(TIER_MODES)}, got {self.tier!r}")
        if self.tier != "drop" and not self.compresses:
            raise ValueError(f"{self.name} evicts nothing: tier={self.tier} sets the precision of evicted tokens")
        if self.quant == "none":
            if self.residual != 128 or (self.group != 32 and self.tier == "drop"):
                raise ValueError(
                    f"{self.name}: group= and residual= set the quantizer; add quant=int8|int4|int2 (or tier=)"
                )
            return
        if self.store != "dense":
            raise ValueError(
                f"{self.name}: quant={self.quant} has its own slot layout on store=dense; store={self.store} holds "
                "full-precision pages (drop store= or quant=)"
            )
        if self.residual + self.group > 32000:
            raise ValueError(f"{self.name}: residual + group must be <= 32000, got {self.residual + self.group}")

    @property
    def spec(self) -> str:
        return f"{self.name}:{format_fields(self)}" if self.compresses else _storage_spec(self)

    def priorities(self, view: LayerView) -> torch.Tensor:
        """``[B, kv_heads or 1, n]`` host scores with forced slots at +inf and invalid ones at -inf."""
        scores = self.host_priority_scores(view)
        heads = scores.shape[1]
        valid, positions = view.valid[:, :heads], view.positions[:, :heads]
        forced = forced_mask(positions, valid, view.start, view.seen, self.sink, self.recent)
        return priority(scores, forced, valid)

    def keep_mask(self, view: LayerView, budget: int) -> torch.Tensor:
        prio = self.priorities(view)
        heads = prio.shape[1]
        keep = top_mask(prio, budget, None if view.order is None else view.order[:, :heads]) & view.valid[:, :heads]
        return keep.expand(-1, view.num_kv_heads, -1) if self.shared else keep


def _storage_spec(policy: Host) -> str:
    """``full`` with only its storage options (``full`` or ``full:store=paged,page=16``)."""
    fields = format_fields(policy, skip=("budget", "sink", "recent", "phase", "interval"))
    return f"{policy.name}:{fields}" if fields else policy.name


@dataclass
class Wrapper(Policy):
    """A policy refining another one (``host``): the configuration and the scoring come from the host."""

    host: Policy

    def __post_init__(self) -> None:
        if self.default_phase_override:
            self.host = self.host.with_default_phase(self.default_phase)
        self.validate()

    #: True when this wrapper's ``default_phase`` replaces the host's default (KVCrush); False keeps the host's
    default_phase_override: ClassVar[bool] = False

    def validate(self) -> None:
        if not isinstance(self.host, Policy) or not self.host.compresses:
            raise ValueError(f"{self.name} wraps a compressing host policy, e.g. h2o+{self.name} or snapkv+{self.name}")

    def with_default_phase(self, phase: str) -> Policy:
        return dataclasses.replace(self, host=self.host.with_default_phase(phase))

    # configuration delegated to the host
    budget = property(lambda self: self.host.budget)
    sink = property(lambda self: self.host.sink)
    recent = property(lambda self: self.host.recent)
    phase = property(lambda self: self.host.phase)
    interval = property(lambda self: self.host.interval)
    store = property(lambda self: self.host.store)
    page = property(lambda self: self.host.page)
    quant = property(lambda self: self.host.quant)
    group = property(lambda self: self.host.group)
    residual = property(lambda self: self.host.residual)
    tier = property(lambda self: self.host.tier)

    @property
    def batchable(self) -> bool:  # type: ignore[override]
        return self.host.batchable

    @property
    def shared(self) -> bool:  # type: ignore[override]
        return self.host.shared

    @property
    def ragged(self) -> bool:  # type: ignore[override]
        return self.host.ragged

    @property
    def reconstructs(self) -> bool:  # type: ignore[override]
        return self.host.reconstructs

    def scorer(self) -> Policy:
        return self.host.scorer()

    def interval_for(self, budget: int) -> int:
        return self.host.interval_for(budget)

    def min_budget(self) -> int:
        return self.host.min_budget()

    @property
    def spec(self) -> str:
        head, _, fields = self.host.spec.partition(":")
        inner = {part.partition("=")[0] for part in fields.split(",")}
        # a key an inner part also has is written ``name.key`` so the spec parses back to the same policy
        own = [
            f"{self.name}.{p}" if p.partition("=")[0] in inner else p
            for p in format_fields(self, skip=("host",)).split(",")
            if p
        ]
        return f"{head}+{self.name}:{','.join(p for p in (fields, *own) if p)}"

    def notes(self) -> list[str]:
        return self.host.notes()

    def request(self, first: bool, q_len: int) -> StatsRequest:
        return self.host.request(first, q_len)

    def observe(self, layer, stats: Stats, first: bool) -> None:
        self.host.observe(layer, stats, first)

    def head_scores(self, view: LayerView) -> torch.Tensor:
        return self.host.head_scores(view)

    def host_priority_scores(self, view: LayerView) -> torch.Tensor:
        return self.host.host_priority_scores(view)

    def budget_for(self, view: LayerView) -> tuple[int, ...]:
        return self.host.budget_for(view)

    def priorities(self, view: LayerView) -> torch.Tensor:
        return self.host.priorities(view)  # type: ignore[attr-defined]

    def keep_mask(self, view: LayerView, budget: int) -> torch.Tensor:
        return self.host.keep_mask(view, budget)
