"""The model's rotary position embedding, for policies that reason about queries at other positions (Expected
Attention): cos/sin at any positions, and the inverse rotation that recovers pre-RoPE queries.

transformers applies ``x * cos + rotate_half(x) * sin`` (``cos``/``sin`` ``[B, T, d]``, possibly scaled by the
RoPE variant's attention factor); crushkv never re-rotates cached keys, so it only needs to read the rotation.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

#: ``rope(positions [B, T], layer_type) -> (cos, sin)``, each ``[B, T, d]`` in float32
Rope = Callable[[torch.Tensor, str], tuple[torch.Tensor, torch.Tensor]]


def find_rope(model) -> Rope | None:
    """The model's ``rotary_emb`` module as a ``Rope`` (Gemma3's takes the layer type), or ``None``."""
    module = next((m for name, m in model.named_modules() if name.endswith("rotary_emb")), None)
    if module is None:
        return None
    typed = "layer_type" in inspect.signature(module.forward).parameters

    def rope(positions: torch.Tensor, layer_type: str) -> tuple[torch.Tensor, torch.Tensor]:
        probe = torch.empty(0, dtype=torch.float32, device=positions.device)
        cos, sin = module(probe, positions, layer_type) if typed else module(probe, positions)
        return cos.float(), sin.float()

    return rope


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse of ``x * cos + rotate_half(x) * sin`` (each channel pair is scaled by ``cos^2 + sin^2``)."""
    return (x * cos - rotate_half(x) * sin) / (cos * cos + sin * sin)


def mean_rotation(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``[B, d, d]`` average of the rotation matrices ``R(p) x = x cos_p + rotate_half(x) sin_p`` over ``T``."""
    c, s = cos.mean(1), sin.mean(1)  # [B, d]
    d = c.shape[-1]
    half = d // 2
    rot = torch.zeros(d, d, dtype=c.dtype, device=c.device)  # rotate_half as a matrix
    rot[:half, half:] = -torch.eye(half, dtype=c.dtype, device=c.device)
    rot[half:, :half] = torch.eye(half, dtype=c.dtype, device=c.device)
    return torch.diag_embed(c) + s[:, :, None] * rot
