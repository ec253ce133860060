"""``module_at``: a crushkv module as of a git revision, for the micro-benchmarks' A/B (``--against REV``)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_at(rev: str, name: str, rewrite: Callable[[str], str] = lambda text: text):
    """``src/crushkv/<name>.py`` as of ``rev``, imported as ``<name>_other`` (registered, so others can import it);
    ``rewrite`` edits the source first (e.g. to point its own imports at other ``*_other`` modules)."""
    text = subprocess.run(
        ["git", "show", f"{rev}:src/crushkv/{name}.py"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / f"{name}_other.py"
    path.write_text(rewrite(text))
    spec = importlib.util.spec_from_file_location(f"{name}_other", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
