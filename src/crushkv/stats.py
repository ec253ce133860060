"""What a policy asks of one attention pass (``StatsRequest``) and what it gets back (``Stats``).

Shared by the math (``attention_math``), the cache side that drives a pass (``layer``) and the policies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

#: ``StatsRequest.rows`` value asking for every query row
ALL_ROWS = -1
#: prompt rows always scored exactly when a ``StatsRequest`` samples rows with ``stride > 1``
TAIL_ROWS = 64


@dataclass(frozen=True)
class StatsRequest:
    """Attention statistics a policy needs from one forward pass of a layer.

    ``rows``: ``None`` for no column sums, ``ALL_ROWS`` for every query row, ``w > 0`` for the last ``w`` rows.
    ``last``: also return the attention row of the last query.
    ``count``: also return, per slot, how many of the summed rows could see it (H2O's lifetime normalisation).
    ``queries``: also hand over this pass's queries, keys and values and the model's RoPE (query-statistics hosts
    such as Expected Attention).
    ``stride``: with ``ALL_ROWS`` on an unpadded causal prompt, estimate the column sums from every ``stride``-th
    query row (weighted by ``stride``) plus the last ``TAIL_ROWS`` rows exactly; 1 = exact.
    """

    rows: int | None = None
    last: bool = False
    count: bool = False
    stride: int = 1
    queries: bool = False

    @property
    def empty(self) -> bool:
        return self.rows is None and not self.last


@dataclass
class Stats:
    """Statistics from one forward pass, aligned with the slots attention ran over (new tokens included).

    ``colsum``: ``[B, kv_heads, group, n]`` sum of attention probabilities over the requested (non-padding) rows,
    one entry per query head (grouped under its KV head). ``count``: ``[B, kv_heads, n]`` number of those rows that
    could see each slot (only when requested). ``last``: ``[B, kv_heads, group, n]`` probabilities of the last
    query row. With ``StatsRequest.queries``: ``query`` ``[B, q_heads, q, d]`` (after RoPE), ``keys``/``values``
    ``[B, kv_heads, q, d]`` of this pass's tokens, their RoPE positions ``[B, q]``, valid flags ``[B, q]``, and
    ``rope(positions, layer_type)`` (``crushkv.rope``).
    """

    colsum: torch.Tensor | None = None
    count: torch.Tensor | None = None
    last: torch.Tensor | None = None
    query: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    rope_positions: torch.Tensor | None = None
    row_valid: torch.Tensor | None = None
    rope: Callable | None = None
    layer_type: str = "full_attention"
