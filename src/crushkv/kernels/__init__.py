"""Optional compiled CPU kernels, built on first use with the system C++ compiler against the installed torch.

``exact_prompt`` fuses the exact H2O prompt pass (logits, softmax, column sums and ``PV`` per cache-resident row
block, the causal triangle balanced over the intra-op threads); ``paged_attend`` reads decode-time attention straight
from a ``store=paged`` pool through its block table; ``quant_attend`` reads it from a ``quant=`` store's packed codes
(dequantizing one slot at a time, never the layer); ``kvcrush_reps`` is KVCrush's whole token selection (signatures,
anchor, distances, picks) for all stacked layers in one call. Without them ``attention_math`` and the KVCrush policy
run the same steps as PyTorch ops (the paged store then gathers its pages). The build (~30 s, once per torch
version) goes to ``<crushkv cache>/kernels/<tag>/``.

``$CRUSHKV_KERNELS``: ``auto`` (default: build when a compiler is found, else fall back with one warning),
``off`` (never build or load), ``require`` (a failed build is an error).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

SOURCES = tuple(
    Path(__file__).with_name(name)
    for name in ("exact_prompt.cpp", "paged_decode.cpp", "quant_decode.cpp", "kvcrush_select.cpp")
)
#: headers the sources include: part of the build's identity
HEADERS = (Path(__file__).with_name("vec_math.h"),)
MODES = ("auto", "off", "require")


@dataclass
class KernelState:
    """Outcome of the one build/load attempt of this process."""

    op: Callable | None = None
    paged: Callable | None = None
    quant: Callable | None = None
    reps: Callable | None = None
    path: Path | None = None
    error: str | None = None
    attempted: bool = False


_STATE = KernelState()
_LOAD_LOCK = threading.Lock()
_DISABLED = 0  # nesting depth of ``disabled()``


def mode() -> str:
    """``$CRUSHKV_KERNELS`` checked against ``MODES``."""
    value = os.environ.get("CRUSHKV_KERNELS", "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"CRUSHKV_KERNELS={value!r}: expected one of {', '.join(MODES)}")
    return value


def compiler() -> str | None:
    """The C++ compiler used for the build (``$CXX``, else ``c++``/``g++``/``clang++`` on ``PATH``)."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _flags() -> list[str]:
    torch_dir = Path(torch.__file__).parent
    flags = [
        "-O3",
        "-std=c++20",
        "-fPIC",
        "-shared",
        "-fopenmp",  # ATen's parallel_for is inlined: without OpenMP it would run on one thread
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        f"-I{torch_dir / 'include'}",
        f"-I{torch_dir / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
    ]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    lib = torch_dir / "lib"
    return [*flags, f"-L{lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib}"]


def build_dir() -> Path:
    """Where this torch/source/flag combination's library lives."""
    from crushkv.models import cache_root

    tag = hashlib.sha256()
    parts = [source.read_bytes() for source in (*SOURCES, *HEADERS)]
    for part in (*parts, torch.__version__.encode(), " ".join(_flags()).encode(), sys.platform.encode()):
        tag.update(part)
    return cache_root() / "kernels" / f"torch{torch.__version__.split('+')[0]}-{tag.hexdigest()[:12]}"


def build() -> Path:
    """Compile the library unless it is already in the cache (a file lock keeps parallel processes from racing)."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set $CXX or install g++)")
    if sysconfig.get_platform().startswith(("win", "macosx")):
        raise RuntimeError(f"crushkv kernels are built on Linux only (platform {sysconfig.get_platform()})")
    target = build_dir()
    library = target / "crushkv_kernels.so"
    if library.exists():
        return library
    import fcntl  # POSIX only, like the build itself

    target.mkdir(parents=True, exist_ok=True)
    with open(target / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if library.exists():  # another process built it while this one waited
            return library
        print(f"crushkv: compiling the fused CPU kernel into {target} (once, ~30 s)", file=sys.stderr)
        partial = target / f".crushkv_kernels.{os.getpid()}.so"
        cmd = [cxx, *(str(source) for source in SOURCES), *_flags(), "-o", str(partial)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            sys.stderr.write(done.stderr[-4000:])
            partial.unlink(missing_ok=True)
            raise RuntimeError(f"kernel build failed ({cxx}, exit {done.returncode}); command: {' '.join(cmd)}")
        partial.replace(library)
    return library


def load() -> KernelState:
    """Build (if needed) and load once per process; failures are remembered, never retried."""
    if _STATE.attempted:
        return _STATE
    with _LOAD_LOCK:  # threads racing here would register the op twice, which aborts the process
        if not _STATE.attempted:
            try:
                _load_once()
            finally:  # set last: a concurrent caller never sees a half-done attempt
                _STATE.attempted = True
    return _STATE


def _load_once() -> None:
    wanted = mode()
    if wanted == "off":
        _STATE.error = "disabled by CRUSHKV_KERNELS=off"
        return
    try:
        _STATE.path = build()
        if not _registered():  # a library loaded by hand earlier already defines the op: one definition only
            torch.ops.load_library(str(_STATE.path))
        _STATE.op = torch.ops.crushkv.exact_prompt
        _STATE.paged = torch.ops.crushkv.paged_attend
        _STATE.quant = torch.ops.crushkv.quant_attend
        _STATE.reps = torch.ops.crushkv.kvcrush_reps
    except (RuntimeError, OSError) as err:
        _STATE.error = str(err)
        if wanted == "require":
            raise
        warnings.warn(f"crushkv: fused CPU kernel unavailable, using the PyTorch-op path: {err}", stacklevel=4)


def _registered() -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("crushkv::exact_prompt", "CPU")
    except RuntimeError:  # no such operator yet
        return False


def exact_prompt() -> Callable | None:
    """``torch.ops.crushkv.exact_prompt`` or ``None`` (kernels off, disabled here, or the build failed)."""
    if _DISABLED:
        return None
    return load().op


def paged_attend() -> Callable | None:
    """``torch.ops.crushkv.paged_attend`` or ``None`` (kernels off, disabled here, or the build failed)."""
    if _DISABLED:
        return None
    return load().paged


def quant_attend() -> Callable | None:
    """``torch.ops.crushkv.quant_attend`` or ``None`` (kernels off, disabled here, or the build failed)."""
    if _DISABLED:
        return None
    return load().quant


def kvcrush_reps() -> Callable | None:
    """``torch.ops.crushkv.kvcrush_reps`` or ``None`` (kernels off, disabled here, or the build failed)."""
    if _DISABLED:
        return None
    return load().reps


def describe() -> str:
    """One line for reports: which compiled kernels this process uses (building them if needed)."""
    if _DISABLED:
        return "off (crushkv.kernels.disabled())"
    state = load()
    return (
        f"exact_prompt, paged_attend, quant_attend, kvcrush_reps ({state.path})"
        if state.op is not None
        else f"off ({state.error})"
    )


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run the PyTorch-op paths inside this block (reference runs, A/B measurements)."""
    global _DISABLED
    _DISABLED += 1
    try:
        yield
    finally:
        _DISABLED -= 1
