"""Directories a command creates: removed again when the command fails before writing anything into them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path


def _missing_ancestors(path: Path) -> list[Path]:
    """``path`` and its parents that do not exist yet, deepest first."""
    out = []
    for p in (path, *path.parents):
        if p.exists():
            break
        out.append(p)
    return out


@contextlib.contextmanager
def cleaned_up_on_failure(path: str | Path) -> Iterator[Path]:
    """Run a block that may create ``path``; if the block raises (Ctrl-C included), remove whatever of ``path`` and
    its parents the block created and left empty. Directories that existed before, or hold files, stay."""
    path = Path(path)
    new = _missing_ancestors(path.absolute())
    try:
        yield path
    except BaseException:
        for p in new:  # deepest first: a parent becomes empty once its new child is gone
            with contextlib.suppress(OSError):  # not empty (or already gone): keep it
                p.rmdir()
        raise
