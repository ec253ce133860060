"""Wilson intervals, exact McNemar p-values and paired comparisons (golden values)."""

from __future__ import annotations

import pytest

from crushkv.eval.paired import is_binary, mcnemar_exact, paired, wilson


@pytest.mark.parametrize(
    ("k", "n", "lo", "hi"),
    [(0, 20, 0.0, 0.1611), (15, 20, 0.5313, 0.8881), (50, 100, 0.4038, 0.5962), (0, 0, 0.0, 1.0)],
)
def test_wilson(k: int, n: int, lo: float, hi: float) -> None:
    assert wilson(k, n) == pytest.approx((lo, hi), abs=1e-4)


@pytest.mark.parametrize(
    ("wins", "losses", "p"),
    [(0, 0, 1.0), (0, 3, 0.25), (3, 0, 0.25), (2, 10, 2 * 79 / 4096), (5, 5, 1.0), (0, 10, 2 / 1024)],
)
def test_mcnemar_exact(wins: int, losses: int, p: float) -> None:
    assert mcnemar_exact(wins, losses) == pytest.approx(p)


def test_paired_uses_common_ids_only() -> None:
    method = [{"id": "a", "m": 1.0}, {"id": "b", "m": 0.0}, {"id": "c", "m": 1.0}, {"id": "x", "m": 1.0}]
    reference = [{"id": "a", "m": 0.0}, {"id": "b", "m": 1.0}, {"id": "c", "m": 1.0}, {"id": "y", "m": 0.0}]
    cmp = paired(method, reference, "m")
    assert (cmp.n, cmp.wins, cmp.losses) == (3, 1, 1)
    assert cmp.method == pytest.approx(2 / 3) and cmp.reference == pytest.approx(2 / 3) and cmp.p_value == 1.0
    assert is_binary(method, "m") and not is_binary([{"id": "a", "m": 0.5}], "m") and not is_binary([], "m")
