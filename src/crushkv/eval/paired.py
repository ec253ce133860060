"""Uncertainty for accuracy tables: Wilson intervals and paired (McNemar) comparisons on the same examples.

Two methods run on the same questions are compared on their *discordant* examples only (one right, the other
wrong); with n = 100 a few points of accuracy are often within noise, and the report says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion (``(0, 1)`` for ``n == 0``)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(wins: int, losses: int) -> float:
    """Two-sided exact McNemar p-value: binomial test of ``wins`` among ``wins + losses`` discordant pairs at 1/2."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class Paired:
    """``method`` vs ``reference`` on the examples both scored."""

    n: int
    method: float
    reference: float
    wins: int
    losses: int

    @property
    def p_value(self) -> float:
        return mcnemar_exact(self.wins, self.losses)


def is_binary(records: list[dict[str, Any]], metric: str) -> bool:
    """True when every record scores ``metric`` as 0 or 1 (exact-match style)."""
    values = [r.get(metric) for r in records]
    return bool(values) and all(v in (0, 1, 0.0, 1.0, True, False) for v in values)


def paired(method: list[dict[str, Any]], reference: list[dict[str, Any]], metric: str) -> Paired:
    """Compare two runs' per-example 0/1 ``metric`` on their common example ids."""
    ref = {r["id"]: float(r[metric]) for r in reference if metric in r}
    mine = {r["id"]: float(r[metric]) for r in method if metric in r}
    common = sorted(set(ref) & set(mine))
    wins = sum(1 for i in common if mine[i] > ref[i])
    losses = sum(1 for i in common if mine[i] < ref[i])
    n = len(common)
    return Paired(
        n=n,
        method=sum(mine[i] for i in common) / n if n else 0.0,
        reference=sum(ref[i] for i in common) / n if n else 0.0,
        wins=wins,
        losses=losses,
    )
