"""Peak memory of a block of work: ``torch.cuda.max_memory_allocated`` on CUDA, the process RSS peak on CPU."""

from __future__ import annotations

import resource
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


@dataclass
class PeakMemory:
    """``peak``: bytes at the peak; ``base``: bytes before the block; ``kind`` says what was measured."""

    kind: str = ""
    base: int = 0
    peak: int = 0

    @property
    def delta(self) -> int:
        return max(0, self.peak - self.base)


def _status_kb(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


@contextmanager
def peak_memory(device: torch.device) -> Iterator[PeakMemory]:
    """Measure the peak over the block. On CPU without a resettable peak, ``ru_maxrss`` (process-wide) is used."""
    result = PeakMemory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        result.kind, result.base = "cuda_max_memory_allocated", torch.cuda.memory_allocated(device)
        yield result
        torch.cuda.synchronize(device)
        result.peak = torch.cuda.max_memory_allocated(device)
        return
    resettable = _reset_rss_peak() and _status_kb("VmHWM") is not None
    result.base = _status_kb("VmRSS") or 0
    result.kind = "rss_hwm" if resettable else "ru_maxrss_process"
    yield result
    if resettable:
        result.peak = _status_kb("VmHWM") or 0
    else:
        result.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
