"""The compiled exact prompt kernel against the PyTorch-op pass, its input checks, and the loader's modes."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch

import crushkv.attention_math as am
from crushkv import kernels
from crushkv.stats import ALL_ROWS, StatsRequest

SHAPES = [  # (B, Hk, G, q, d, dv)
    (1, 1, 1, 1, 8, 8),
    (1, 1, 1, 9, 8, 8),
    (2, 2, 3, 37, 16, 16),
    (1, 3, 3, 300, 64, 64),
    (2, 1, 4, 129, 32, 48),
]


def _inputs(shape, seed: int = 0):
    b, hk, g, q, d, dv = shape
    gen = torch.Generator().manual_seed(seed)
    grouped = torch.randn(b, hk, g, q, d, generator=gen) * 2.0
    keys = torch.randn(b, hk, q, d, generator=gen)
    values = torch.randn(b, hk, q, dv, generator=gen)
    return grouped, keys, values


def _reference(grouped, keys, values, scaling):
    with kernels.disabled():
        return am._exact_prompt_pass(grouped, keys, values, scaling, StatsRequest(rows=ALL_ROWS, last=True, count=True))


@pytest.mark.parametrize("block", [64, 1 << 19], ids=["many-blocks", "default-blocks"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_matches_op_pass(shape, block: int, compiled_kernel) -> None:
    b, hk, g, q, d, dv = shape
    grouped, keys, values = _inputs(shape)
    scaling = d**-0.5
    want_out, want = _reference(grouped, keys, values, scaling)
    rows = grouped.transpose(2, 3).contiguous()
    out, colsum, last = compiled_kernel(rows, (keys * scaling).contiguous(), values, block, True)
    assert out.shape == (b, q, hk, g, dv)
    torch.testing.assert_close(out.view(b, q, hk * g, dv), want_out, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(colsum, want.colsum, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last, want.last, atol=1e-6, rtol=1e-5)
    # every causal row is a distribution: the column sums of one head add up to the number of rows
    torch.testing.assert_close(colsum.sum(-1), torch.full((b, hk, g), float(q)), atol=1e-3, rtol=1e-5)
    _, _, none = compiled_kernel(rows, (keys * scaling).contiguous(), values, block, False)
    assert none.numel() == 0


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_kernel_threads_agree(threads: int, compiled_kernel) -> None:
    """Blocks handed out dynamically to any number of threads give the same result (sums up to rounding)."""
    grouped, keys, values = _inputs((2, 3, 2, 257, 32, 32), seed=3)
    rows, keys = grouped.transpose(2, 3).contiguous(), (keys * 32**-0.5).contiguous()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        want = compiled_kernel(rows, keys, values, 512, True)
        torch.set_num_threads(threads)
        got = compiled_kernel(rows, keys, values, 512, True)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got[0], want[0], atol=0, rtol=0)  # each block's output is computed by one thread
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(got[2], want[2], atol=0, rtol=0)


def test_attend_uses_the_kernel(monkeypatch: pytest.MonkeyPatch, compiled_kernel) -> None:
    """``attend`` on a CPU fp32 causal prompt with exact statistics goes through the kernel, and not under autograd,
    for other dtypes or inside ``kernels.disabled()``."""
    calls = []
    monkeypatch.setattr(kernels, "exact_prompt", lambda: lambda *a: calls.append(1) or compiled_kernel(*a))
    query = torch.randn(1, 4, 20, 8)
    keys, values = torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 8)
    plain = am.Visibility(
        torch.arange(20).expand(1, 1, 20), torch.ones(1, 1, 20, dtype=torch.bool), torch.arange(20), plain=True
    )
    run = lambda q, k, v: am.attend(
        q, k, v, plain, torch.ones(1, 20, dtype=torch.bool), 8**-0.5, StatsRequest(rows=ALL_ROWS)
    )
    run(query, keys, values)
    assert calls == [1]
    run(query.bfloat16(), keys.bfloat16(), values.bfloat16())
    run(query.requires_grad_(True), keys, values)
    assert calls == [1]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda q, k, v: (q.double(), k.double(), v.double()), "fp32 only"),
        (lambda q, k, v: (q.transpose(-1, -2), k, v), "contiguous"),
        (lambda q, k, v: (q, k[:, :, :-1].contiguous(), v), "keys must be"),
        (lambda q, k, v: (q[0], k, v), "bad ranks"),
    ],
)
def test_kernel_rejects_bad_input(change, message: str, compiled_kernel) -> None:
    grouped, keys, values = _inputs((1, 2, 2, 16, 8, 8))
    q, k, v = change(grouped.transpose(2, 3).contiguous(), keys, values)
    with pytest.raises(RuntimeError, match=message):
        compiled_kernel(q, k, v, 64, False)


def test_disabled_context_and_invalid_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    with kernels.disabled(), kernels.disabled():
        assert kernels.exact_prompt() is None
    monkeypatch.setenv("CRUSHKV_KERNELS", "sometimes")
    with pytest.raises(ValueError, match="CRUSHKV_KERNELS='sometimes'"):
        kernels.mode()


def test_off_mode_never_builds(tmp_path) -> None:
    """``CRUSHKV_KERNELS=off``: nothing is compiled or loaded, the op path still gives exact statistics."""
    code = (
        "import torch, crushkv.kernels as k, crushkv.attention_math as am\n"
        "from crushkv.stats import ALL_ROWS, StatsRequest\n"
        "assert k.exact_prompt() is None and k.load().error.startswith('disabled')\n"
        "q = torch.randn(1, 2, 12, 8); kv = torch.randn(1, 1, 12, 8)\n"
        "vis = am.Visibility(torch.arange(12).expand(1, 1, 12), torch.ones(1, 1, 12, dtype=torch.bool),"
        " torch.arange(12), plain=True)\n"
        "_, s = am.attend(q, kv, kv, vis, torch.ones(1, 12, dtype=torch.bool), 0.3, StatsRequest(rows=ALL_ROWS))\n"
        "assert torch.allclose(s.colsum.sum(-1), torch.full((1, 1, 2), 12.0))\n"
        "assert not any((p / 'kernels').exists() for p in [__import__('pathlib').Path(r'" + str(tmp_path) + "')])\n"
    )
    env = {"CRUSHKV_KERNELS": "off", "CRUSHKV_CACHE": str(tmp_path), "PATH": ""}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_missing_compiler_falls_back_with_a_warning(tmp_path) -> None:
    """``auto`` without a compiler warns once and uses the op path; ``require`` makes it an error."""
    code = (
        "import warnings, crushkv.kernels as k\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    assert k.exact_prompt() is None and k.exact_prompt() is None\n"
        "assert len(w) == 1 and 'no C++ compiler' in str(w[0].message), [str(x.message) for x in w]\n"
    )
    env = {"CRUSHKV_CACHE": str(tmp_path), "PATH": "", "CXX": ""}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    strict = subprocess.run(
        [sys.executable, "-c", "import crushkv.kernels as k; k.exact_prompt()"],
        env={**env, "CRUSHKV_KERNELS": "require"},
        capture_output=True,
        text=True,
    )
    assert strict.returncode != 0 and "no C++ compiler" in strict.stderr


def test_cli_reports_the_kernel(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, compiled_kernel):
    from crushkv.cli import main

    assert main(["kernels", "--check"]) == 0
    assert "kernels: exact_prompt, paged_attend, quant_attend, kvcrush_reps (" in capsys.readouterr().out
    monkeypatch.setenv("CRUSHKV_KERNELS", "never")
    assert main(["kernels"]) == 2
    assert "CRUSHKV_KERNELS='never'" in capsys.readouterr().err


@pytest.mark.parametrize("path", ["ops", "compiled"])
def test_exact_pass_memory_is_not_quadratic(path: str, request: pytest.FixtureRequest) -> None:
    """A 4k prompt's exact pass (one head) raises the RSS peak by less than half an ``L x L`` fp32 matrix (64 MB;
    measured 3 MB compiled, 13 MB ops): blocks of ``HEAD_BLOCK_ELEMENTS`` (2 MB) per thread, never the triangle."""
    from crushkv.bench.memory import peak_memory

    if path == "compiled":
        request.getfixturevalue("compiled_kernel")
    q = 4096
    grouped, keys, values = _inputs((1, 1, 1, q, 64, 64))
    scope = kernels.disabled() if path == "ops" else contextlib.nullcontext()
    with torch.inference_mode(), scope:
        am._exact_prompt_pass(
            grouped[..., :256, :], keys[..., :256, :], values[..., :256, :], 0.125, StatsRequest(rows=ALL_ROWS)
        )  # warm-up: thread pools, first-touch buffers
        with peak_memory(torch.device("cpu")) as mem:
            _, stats = am._exact_prompt_pass(grouped, keys, values, 0.125, StatsRequest(rows=ALL_ROWS))
    if mem.kind != "rss_hwm":
        pytest.skip("the RSS peak cannot be reset on this system")
    assert stats.colsum.shape == (1, 1, 1, q)
    grown = mem.peak - mem.base
    assert grown < 32 * 2**20, f"{path}: RSS peak grew by {grown / 2**20:.1f} MB (L x L fp32 = 64 MB)"


def test_concurrent_first_loads_register_once(tmp_path, compiled_kernel) -> None:
    """Threads racing to the first use, with an empty kernel cache: all get the op once it is built (none falls
    back while another builds), and it is registered once (a second registration aborts the process)."""
    code = (
        "import threading, crushkv.kernels as k\n"
        "seen = []\n"
        "ts = [threading.Thread(target=lambda: seen.append(k.exact_prompt())) for _ in range(4)]\n"
        "[t.start() for t in ts]; [t.join() for t in ts]\n"
        "assert len(seen) == 4 and all(op is not None for op in seen), seen\n"
    )
    env = {**os.environ, "CRUSHKV_CACHE": str(tmp_path), "CRUSHKV_KERNELS": "auto"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.count("compiling the fused CPU kernel") == 1, done.stderr[-2000:]


def _assert_same_attention(got_out, got, want_out, want) -> None:
    """Kernel and op path agree on the output and on every statistic either returns."""
    torch.testing.assert_close(got_out, want_out, atol=1e-5, rtol=1e-5)
    for name in ("colsum", "count", "last"):
        a, e = getattr(got, name), getattr(want, name)
        assert (a is None) == (e is None), name
        if a is not None:
            torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("store", ["dense", "paged"])
@pytest.mark.parametrize(
    ("hk", "g", "q", "n", "dv", "per_head"),
    [(2, 3, 1, 37, 8, True), (1, 4, 1, 64, 8, False), (3, 1, 3, 50, 12, True), (2, 2, 16, 16, 8, False)],
)
def test_paged_kernel_matches_the_op_path(store, hk, g, q, n, dv, per_head, compiled_kernel) -> None:
    """Decode attention read through the block table (a dense store is one page per row) equals the gathered op
    path: output, column sums, counts and last row, with holes, per-head masks and new-token causality."""
    from crushkv.stores import BlockPool, DenseStore, PagedStore

    b, d = 2, 8
    gen = torch.Generator().manual_seed(hk * 100 + n)
    keys, values = torch.randn(b, hk, n, d, generator=gen), torch.randn(b, hk, n, dv, generator=gen)
    query = torch.randn(b, hk * g, q, d, generator=gen)
    heads = hk if per_head else 1
    positions = torch.rand(b, heads, n, generator=gen).argsort(-1)  # slots hold positions in any order
    valid = torch.rand(b, heads, n, generator=gen) > 0.3
    valid |= positions >= n - q  # this pass's own tokens
    vis = am.Visibility(positions, valid, torch.arange(n - q, n))
    row_valid = torch.ones(b, q, dtype=torch.bool)
    if q > 1:
        row_valid[0, 0] = False  # a padding query in a multi-token pass contributes no statistics
    if store == "dense":
        kv = DenseStore()
    else:
        kv = PagedStore(BlockPool(4, d, dv, torch.float32, torch.device("cpu")))
    kv.adopt(keys, values)
    for request in (StatsRequest(rows=ALL_ROWS, last=True, count=True), StatsRequest(rows=2), StatsRequest()):
        got_out, got = am.paged_attend(query, kv.page_view(n), n, vis, row_valid, 0.3, request)
        with kernels.disabled():
            assert am.paged_attend(query, kv.page_view(n), n, vis, row_valid, 0.3, request) is None
        want_out, want = am.attend(query, *kv.dense(n), vis, row_valid, 0.3, request)
        _assert_same_attention(got_out, got, want_out, want)


def test_paged_kernel_rejects_bad_input(compiled_kernel) -> None:
    op = kernels.paged_attend()
    rows, pool = torch.randn(1, 1, 1, 8), torch.randn(3, 4, 8)
    table, vis = torch.tensor([[1, 2]]), torch.ones(1, 1, 1, 8, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="table must map n slots"):
        op(rows, pool, pool, table, 9, torch.ones(1, 1, 1, 9, dtype=torch.bool), 1.0, False)
    with pytest.raises(RuntimeError, match="fp32 only"):
        op(rows.double(), pool, pool, table, 8, vis, 1.0, False)
    with pytest.raises(RuntimeError, match="int64 table and bool mask"):
        op(rows, pool, pool, table.int(), 8, vis, 1.0, False)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize(("g", "q", "dk", "dv", "per_head"), [(3, 1, 16, 12, True), (2, 4, 12, 16, False)])
def test_quant_kernel_matches_attention_over_the_dequantized_slots(bits, g, q, dk, dv, per_head, compiled_kernel):
    """Decode attention read from a ``quant=`` store's packed codes equals attention over ``QuantStore.dense``:
    quantized groups, the full-precision residual, slots freed inside a group, a rewritten slot, and head sizes
    that leave ragged bytes and a ragged value group."""
    from crushkv.stores import QuantScratch, QuantStore

    b, hk, n = 2, 2, 40
    gen = torch.Generator().manual_seed(bits * 10 + q)
    keys, values = torch.randn(b, hk, n + 1, dk, generator=gen), torch.randn(b, hk, n + 1, dv, generator=gen)
    store = QuantStore(bits, 8, 6, QuantScratch())
    store.adopt(keys[:, :, :n], values[:, :, :n])
    freed = torch.rand(b, hk, n, generator=gen) < 0.25
    freed[..., n - q :] = False
    if not per_head:  # one visibility row for every head: every head holds the same token in each slot
        freed = freed[:, :1].expand(b, hk, n).clone()
    store.evicted(freed)
    slot = freed.float().argmax(-1, keepdim=True)  # each row rewrites one freed slot with a new token
    store.write(slot, keys[:, :, n:], values[:, :, n:])
    held = ~freed
    held.scatter_(-1, slot, True)
    assert bool((store.where[:, :, :n] >= 0).any()) and bool((store.where[:, :, :n] < -1).any())
    query = torch.randn(b, hk * g, q, dk, generator=gen)
    positions = torch.arange(n).expand(b, hk, n).clone()
    positions.scatter_(-1, slot, n)
    heads = hk if per_head else 1
    valid = held[:, :heads]
    vis = am.Visibility(positions[:, :heads], valid, torch.arange(n - q + 1, n + 1))
    row_valid = torch.ones(b, q, dtype=torch.bool)
    for request in (StatsRequest(rows=ALL_ROWS, last=True, count=True), StatsRequest()):
        got_out, got = am.paged_attend(query, store.page_view(n), n, vis, row_valid, 0.3, request)
        want_out, want = am.attend(query, *store.dense(n), vis, row_valid, 0.3, request)
        _assert_same_attention(got_out, got, want_out, want)
    with kernels.disabled():
        assert am.paged_attend(query, store.page_view(n), n, vis, row_valid, 0.3, StatsRequest()) is None


def test_quant_kernel_rejects_a_slot_outside_the_store(compiled_kernel):
    from crushkv.stores import QuantScratch, QuantStore

    store = QuantStore(4, 4, 4, QuantScratch())
    store.adopt(torch.randn(1, 1, 12, 8), torch.randn(1, 1, 12, 8))
    store.where[0, 0, 0] = 99  # no such key group
    visible = torch.ones(1, 1, 1, 12, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="key group or residual entry"):
        kernels.quant_attend()(torch.randn(1, 1, 1, 8), *store.page_view(12)[:9], 12, visible, 1.0, 4, 8, False)
