"""Argument types shared by the sub-commands: each turns text into a value or raises ``ArgumentTypeError``.

argparse reports an ``ArgumentTypeError`` as ``argument --x: <message>``; a plain ``ValueError`` would read
``invalid _ints value: 'abc'``, which names a Python function instead of what the option wants.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default, except for flags (off) and options without one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        no_default = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if no_default or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


DTYPE_HELP = "float32 (fp32) | bfloat16 (bf16) | float16 (fp16)"


def dtype_name(text: str) -> str:
    """Canonical dtype name (``float32``, ``bfloat16``, ``float16``) of any accepted spelling."""
    from crushkv.dtypes import canonical

    try:
        return canonical(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def at_least(low: int) -> Callable[[str], int]:
    """An integer type that rejects values below ``low``."""

    def parse(text: str) -> int:
        value = _int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"int>={low}"
    return parse


positive_int = at_least(1)
non_negative_int = at_least(0)


def _items(text: str) -> list[str]:
    return [x for x in text.replace(" ", "").split(",") if x]


def token_count(text: str) -> int:
    """``"2048"`` or ``"2k"`` (= 2048) -> a positive token count."""
    part = text.strip().lower()
    try:
        value = int(float(part[:-1]) * 1024) if part.endswith("k") else int(part)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected token counts like 1024 or 2k, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"token counts must be >= 1, got {text!r}")
    return value


def token_counts(text: str) -> tuple[int, ...]:
    """``"1k,2k,4096"`` -> ``(1024, 2048, 4096)`` (sorted, without duplicates)."""
    values = sorted({token_count(x) for x in _items(text)})
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts like 1024,2k, got {text!r}")
    return tuple(values)


def percent(text: str) -> float:
    """A percentage in [0, 100] (needle depths)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a percentage in [0, 100], got {text!r}") from None
    if not 0.0 <= value <= 100.0:
        raise argparse.ArgumentTypeError(f"depths are percentages in [0, 100], got {text!r}")
    return value


def percents(text: str) -> tuple[float, ...]:
    """``"0,50,100"`` -> ``(0.0, 50.0, 100.0)``, every value a percentage in [0, 100]."""
    values = tuple(percent(x) for x in _items(text))
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated percentages like 0,50,100, got {text!r}")
    return values


def words(text: str) -> tuple[str, ...]:
    """``"a, b,c"`` -> ``("a", "b", "c")``."""
    values = tuple(_items(text))
    if not values:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return values
