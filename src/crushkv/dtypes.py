"""Dtype names: every accepted spelling (``fp16``, ``bf16``, ``float32``, ...) and its canonical torch name."""

from __future__ import annotations

import torch

from crushkv.errors import UsageError

# spelling -> canonical torch name; results record the canonical name, so two spellings never split one run
ALIASES: dict[str, str] = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}
VALID = "float32 (fp32), bfloat16 (bf16), float16 (fp16)"


def canonical(dtype: str | torch.dtype) -> str:
    """``"fp16"`` -> ``"float16"``; a ``torch.dtype`` gives its own name. UsageError listing the valid names."""
    text = str(dtype).strip().lower().removeprefix("torch.")
    name = ALIASES.get(text)
    if name is None:
        raise UsageError(f"unknown dtype {str(dtype)!r}; valid: {VALID}")
    return name


def to_torch(dtype: str | torch.dtype) -> torch.dtype:
    """The ``torch.dtype`` of any accepted spelling (a ``torch.dtype`` is returned unchanged)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    return getattr(torch, canonical(dtype))
