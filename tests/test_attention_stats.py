"""Attention statistics (H2O-style column sums, counts, last row) against a naive softmax reference."""

from __future__ import annotations

import contextlib

import pytest
import torch

import crushkv.attention_math as am
from crushkv import kernels
from crushkv.stats import ALL_ROWS, TAIL_ROWS, StatsRequest

B, HK, G, D = 2, 2, 3, 16


def _inputs(q: int, dtype: torch.dtype = torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(B, HK * G, q, D, generator=gen).mul(2.0).to(dtype)
    keys = torch.randn(B, HK, q, D, generator=gen).to(dtype)
    values = torch.randn(B, HK, q, D, generator=gen).to(dtype)
    return query, keys, values


def _naive(query, keys, values, scaling):
    """Output ``[B, q, Hq, D]``, column sums ``[B, Hk, G, q]``, last row, from an explicit causal softmax (fp64)."""
    q = query.shape[2]
    k = keys.double().repeat_interleave(G, dim=1)
    logits = query.double() @ k.transpose(-1, -2) * scaling
    logits = logits.masked_fill(torch.ones(q, q, dtype=torch.bool).triu(1), float("-inf"))
    probs = logits.softmax(-1)
    out = (probs @ values.double().repeat_interleave(G, dim=1)).transpose(1, 2)
    grouped = probs.view(B, HK, G, q, q)
    return out, grouped.sum(-2), grouped[..., -1, :]


def _visibility(q: int, plain: bool) -> am.Visibility:
    """Slots 0..q-1 holding positions 0..q-1; ``plain`` lets the pass assume the causal prompt without a mask."""
    positions = torch.arange(q).expand(B, 1, q)
    return am.Visibility(positions, torch.ones(B, 1, q, dtype=torch.bool), torch.arange(q), plain=plain)


def _run(query, keys, values, request, masked: bool = False):
    q = query.shape[2]
    row_valid = torch.ones(B, q, dtype=torch.bool)
    return am.attend(query, keys, values, _visibility(q, plain=not masked), row_valid, D**-0.5, request)


@pytest.mark.parametrize(
    "path", ["ops-head-by-head", "ops-heads-batched", "compiled"], ids=["head-by-head", "heads-batched", "compiled"]
)
@pytest.mark.parametrize("block", [1 << 21, 600], ids=["one-block", "many-blocks"])
def test_prompt_statistics_exact(monkeypatch: pytest.MonkeyPatch, block: int, path: str, compiled_kernel) -> None:
    """The exact prompt pass (PyTorch ops head by head, batched like on GPU, or the compiled kernel) against fp64."""
    monkeypatch.setattr(am, "STATS_BLOCK_ELEMENTS", block)
    monkeypatch.setattr(am, "HEAD_BLOCK_ELEMENTS", block)
    if path == "ops-heads-batched":  # the GPU layout: every (batch row, KV head) in one matmul per row block
        monkeypatch.setattr(am, "heads_per_matmul", lambda device, heads: heads)
    calls = []
    if path == "compiled":
        monkeypatch.setattr(kernels, "exact_prompt", lambda: lambda *a: calls.append(a[3]) or compiled_kernel(*a))
    else:
        monkeypatch.setattr(kernels, "exact_prompt", lambda: None)

    def no_second_pass(*args):
        raise AssertionError("exact statistics must come from the output's own probability blocks (one QK^T)")

    monkeypatch.setattr(am, "_fused_output_and_lse", no_second_pass)
    query, keys, values = _inputs(157)
    out, stats = _run(query, keys, values, StatsRequest(rows=ALL_ROWS, last=True, count=True))
    ref_out, ref_colsum, ref_last = _naive(query, keys, values, D**-0.5)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats.colsum.double(), ref_colsum, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(stats.last.double(), ref_last, atol=1e-6, rtol=1e-5)
    expected_count = (157 - torch.arange(157)).float().expand(B, HK, 157)
    assert torch.equal(stats.count, expected_count)
    assert calls == ([block] if path == "compiled" else [])


@pytest.mark.parametrize("stride", [1, 3], ids=["exact", "strided-fused-lse"])
def test_prompt_statistics_bfloat16(stride: int) -> None:
    q = 203
    query, keys, values = _inputs(q, torch.bfloat16)
    _, stats = _run(query, keys, values, StatsRequest(rows=ALL_ROWS, stride=stride))
    _, ref_colsum, _ = _naive(query, keys, values, D**-0.5)
    # every row's probabilities sum to one (16-bit lse carried as hi+lo), so the total mass is the number of rows
    rows = q if stride == 1 else len(range(q - TAIL_ROWS - 1, -1, -stride)) * stride + TAIL_ROWS
    torch.testing.assert_close(
        stats.colsum.sum(-1).double(), torch.full((B, HK, G), float(rows), dtype=torch.float64), rtol=2e-2, atol=0
    )
    rel = (stats.colsum.double() - ref_colsum).abs().sum() / ref_colsum.abs().sum()
    assert rel < (2e-2 if stride == 1 else 0.35), rel


def test_masked_path_matches_prompt_path() -> None:
    """The generic (explicit visibility) pass and the causal prompt pass agree."""
    query, keys, values = _inputs(90)
    out_a, a = _run(query, keys, values, StatsRequest(rows=ALL_ROWS, count=True), masked=True)
    out_b, b = _run(query, keys, values, StatsRequest(rows=ALL_ROWS, count=True))
    torch.testing.assert_close(out_a, out_b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.colsum, b.colsum, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(a.count, b.count)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-lse", "sdpa-output"])
@pytest.mark.parametrize("stride", [2, 5])
def test_strided_statistics(monkeypatch: pytest.MonkeyPatch, fused: bool, stride: int) -> None:
    if not fused:
        monkeypatch.setattr(am, "_fused_output_and_lse", lambda *a: None)
    q = 400
    query, keys, values = _inputs(q, seed=1)
    out, stats = _run(query, keys, values, StatsRequest(rows=ALL_ROWS, stride=stride))
    ref_out, ref_colsum, _ = _naive(query, keys, values, D**-0.5)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)  # the output is always exact
    tail = slice(q - TAIL_ROWS, q)  # columns only the exact tail rows can see
    torch.testing.assert_close(stats.colsum[..., tail].double(), ref_colsum[..., tail], atol=1e-4, rtol=1e-5)
    sampled = len(range(q - TAIL_ROWS - 1, -1, -stride))
    total = torch.full((B, HK, G), float(sampled * stride + TAIL_ROWS), dtype=torch.float64)
    torch.testing.assert_close(stats.colsum.sum(-1).double(), total, atol=1e-3, rtol=1e-6)
    rel = (stats.colsum.double() - ref_colsum).abs().sum() / ref_colsum.abs().sum()
    assert 0 < rel < 0.35, rel  # an estimate, not the exact sums


@pytest.mark.parametrize("inference", ["ops", "compiled"])
def test_exact_prompt_pass_under_autograd_matches_inference(inference: str, compiled_kernel) -> None:
    """With inputs that require grad the pass keeps autograd-safe ops (no ``out=`` buffers, no compiled kernel) and
    gives the same output and statistics as in inference mode; the output can be differentiated."""
    query, keys, values = _inputs(64)
    request = StatsRequest(rows=ALL_ROWS)
    with torch.no_grad(), kernels.disabled() if inference == "ops" else contextlib.nullcontext():
        want_out, want = _run(query, keys, values, request)
    query.requires_grad_(True)
    out, stats = _run(query, keys, values, request)
    out.sum().backward()
    assert query.grad is not None and torch.isfinite(query.grad).all()
    torch.testing.assert_close(out.detach(), want_out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(stats.colsum.detach(), want.colsum, atol=1e-6, rtol=1e-6)
