"""Growth exponents: least-squares slope of ``log(cost)`` against ``log(context length)``."""

from __future__ import annotations

import math
from collections.abc import Sequence


def fit_exponent(lengths: Sequence[float], values: Sequence[float]) -> dict[str, float]:
    """Fit ``value = c * length**k``; returns exponent ``k``, ``c`` and ``r2`` (NaN below 2 usable points)."""
    points = [(math.log(x), math.log(y)) for x, y in zip(lengths, values, strict=True) if x > 0 and y > 0]
    nan = float("nan")
    if len({x for x, _ in points}) < 2:
        return {"exponent": nan, "coef": nan, "r2": nan, "points": len(points)}
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    sxy = sum((x - mx) * (y - my) for x, y in points)
    slope = sxy / sxx
    intercept = my - slope * mx
    ss_tot = sum((y - my) ** 2 for _, y in points)
    ss_res = sum((y - (intercept + slope * x)) ** 2 for x, y in points)
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return {"exponent": slope, "coef": math.exp(intercept), "r2": r2, "points": n}
