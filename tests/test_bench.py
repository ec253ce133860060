"""``crushkv bench`` plumbing on a tiny random Llama: fields, same-run ratios, exponent fit, JSON and PNG."""

from __future__ import annotations

import json
import math

import pytest
import torch

from crushkv.bench import commands
from crushkv.bench.fit import fit_exponent
from crushkv.bench.runner import GROWTH_METRICS, BenchSettings, expected_tokens, run_bench

POLICIES = ["snapkv:budget=0.5,window=8,sink=0", "h2o+kvcrush:budget=0.5,crush=0.25,anchor=mean,recent=8"]
LENGTHS = [64, 128]


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def report():
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 160))
    settings = BenchSettings(lengths=LENGTHS, policies=POLICIES, new_tokens=4, repeats=2, meta={"model": "tiny"})
    return run_bench(model, ids, settings, progress=False)


def test_report_names_the_cpu_kernels(report):
    from crushkv import kernels

    want = "exact_prompt, paged_attend, quant_attend, kvcrush_reps (" if kernels.load().op is not None else "off ("
    assert report["meta"]["cpu_kernels"].startswith(want)


def test_cells_have_every_field(report):
    cells = report["cells"]
    assert len(cells) == len(LENGTHS) * 3
    assert {c["policy"].split(":")[0] for c in cells} == {"full", "snapkv", "h2o+kvcrush"}
    for c in cells:
        for key in (
            "prefill_s",
            "ttft_s",
            "decode_tokens_per_s",
            "e2e_s",
            "scoring_overhead_s",
            "host_select_s",
            "kvcrush_s",
            "gather_s",
            "observe_s",
            "kv_nbytes",
            "kv_logical_nbytes",
            "full_nbytes",
            "max_nbytes",
            "peak_mem_bytes",
            "peak_mem_kind",
            "bytes_vs_expected_max_dev",
            "vs_full",
        ):
            assert key in c, key
        assert c["e2e_s"] == pytest.approx(c["prefill_s"] + c["decode_s"])
        # tokens held match the budget share within 2 %; storage adds the store's slack on top (tests/test_memory.py)
        assert c["kv_nbytes"] >= c["kv_logical_nbytes"]
        assert c["storage_overhead_max"] >= 0.0
        assert abs(c["bytes_vs_expected_max_dev"]) <= 0.02
        assert c["bytes_steps_checked"] == 4
    kvcrush = [c for c in cells if "+kvcrush" in c["policy"]]
    assert all(c["kvcrush_s"] > 0 for c in kvcrush)
    assert all(c["scoring_overhead_s"] == 0 for c in cells if c["policy"] == "full")


def test_ratios_come_from_the_same_run(report):
    cells = report["cells"]
    for c in cells:
        full = next(f for f in cells if f["policy"] == "full" and f["length"] == c["length"])
        assert c["vs_full"]["prefill"] == pytest.approx(c["prefill_s"] / full["prefill_s"])
        assert c["vs_full"]["e2e"] == pytest.approx(c["e2e_s"] / full["e2e_s"])
        assert c["vs_full"]["kv_nbytes"] == pytest.approx(c["kv_nbytes"] / full["kv_nbytes"])
        tps = c["decode_tokens_per_s"] / full["decode_tokens_per_s"]
        assert c["vs_full"]["decode_tokens_per_s"] == pytest.approx(tps)
        if c["policy"] == "full":
            assert c["vs_full"]["e2e"] == 1.0
    assert set(report["fits"]) == {c["policy"] for c in cells}
    assert all(set(f) == set(GROWTH_METRICS) for f in report["fits"].values())
    assert any(t["target"].startswith("kvcrush") for t in report["targets"])


def test_exponent_fit_on_synthetic_data():
    lengths = [1024, 2048, 4096, 8192]
    fit = fit_exponent(lengths, [3e-6 * n**1.7 for n in lengths])
    assert fit["exponent"] == pytest.approx(1.7)
    assert fit["coef"] == pytest.approx(3e-6)
    assert fit["r2"] == pytest.approx(1.0)
    assert math.isnan(fit_exponent([1024], [1.0])["exponent"])
    assert fit_exponent([1, 2], [0.0, 0.0])["points"] == 0


def test_expected_tokens_by_phase():
    assert expected_tokens("full", 100, 3) == 103
    assert expected_tokens("snapkv:budget=0.25,window=8", 100, 3) == 28  # prefill phase: grows after compression
    assert expected_tokens("h2o:budget=0.25,recent=8", 100, 3) == 25  # decode phase: cut back every step


def test_json_png_and_tables(report, tmp_path):
    from crushkv.bench.plots import plot_growth

    out = commands.write_report(report, tmp_path / "bench.json")
    loaded = json.loads(out.read_text())
    assert loaded["meta"]["lengths"] == LENGTHS and len(loaded["cells"]) == 6
    png = plot_growth(report, tmp_path / "bench.png", title="tiny")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(png) as image:  # readable when scaled down: >= 150 dpi (was 72)
        assert image.info["dpi"][0] >= 149.9 and image.size[0] >= 1800
    text = commands.format_report(report)
    assert "| ctx | policy |" in text and "scoring overhead" in text and "exponent" in text
    from crushkv.cli import build_parser

    args = build_parser().parse_args(["bench", "--from-json", str(out), "--png", str(tmp_path / "again.png")])
    assert args.func(args) == 0 and (tmp_path / "again.png").exists()  # tables and plot from a saved report


def test_parse_lengths_and_cli_parser():
    assert commands.parse_lengths("1k,2k,4096,1k") == [1024, 2048, 4096]
    with pytest.raises(ValueError):
        commands.parse_lengths("0")
    from crushkv.cli import build_parser

    args = build_parser().parse_args(["bench", "--lengths", "1k,2k", "--policy", "h2o:budget=0.25", "--threads", "1"])
    assert args.func is commands.run and args.policy == ["h2o:budget=0.25"] and args.new_tokens == 32


def test_agreement_rows():
    from crushkv.bench.agreement import agreement, format_rows

    ref = "h2o:budget=0.25,sink=2,recent=4,phase=prefill"
    others = [ref.replace("phase=", "stride=4,phase="), "streaming:budget=0.25,sink=2,phase=prefill"]
    rows = agreement(tiny_llama(), {300: torch.randint(0, 128, (1, 300))}, ref, others)
    by = {r["policy"]: r for r in rows}
    assert by[ref]["jaccard_mean"] == by[ref]["jaccard_min"] == 1.0
    assert 0.0 < by[others[0]]["jaccard_min"] <= by[others[0]]["jaccard_mean"] <= 1.0
    assert by[others[1]]["jaccard_mean"] < by[others[0]]["jaccard_mean"]  # sampled H2O is closer to H2O
    for r in rows:
        assert r["full_s"] > 0 and r["prefill_s"] > 0 and r["length"] == 300
    assert "(reference)" in format_rows(rows)


def test_short_names_label_the_schedule():
    from crushkv.bench.plots import short_name

    base = "h2o+kvcrush:budget=0.25,sink=4,recent=32,phase=decode"
    assert short_name(f"{base},interval=1") == "h2o+kvcrush b=0.25 decode"
    assert short_name(f"{base},interval=16") == "h2o+kvcrush b=0.25 decode every 16"
    assert short_name(f"{base},interval=auto") == "h2o+kvcrush b=0.25 decode interval=auto"
    assert short_name(f"{base},interval=1,store=paged") == "h2o+kvcrush b=0.25 decode store=paged"
    assert short_name(f"{base},interval=1,store=dense,quant=int4") == "h2o+kvcrush b=0.25 decode quant=int4"
    assert short_name("full") == "full"


def test_defer_bytes_reaches_the_cache_and_the_report(report):
    """``--defer-bytes 0`` (layer-by-layer prompt cuts) is recorded and keeps the same tokens as the default."""
    from crushkv.bench.timing import timed_generation
    from crushkv.layer_stack import DEFER_MAX_BYTES

    assert report["meta"]["defer_bytes"] == DEFER_MAX_BYTES
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 96), generator=torch.Generator().manual_seed(3))
    runs = [timed_generation(model, ids, POLICIES[1], 4, profile=True, defer_bytes=d) for d in (0, None)]
    assert runs[0].output_ids == runs[1].output_ids and runs[0].kept_tokens == runs[1].kept_tokens
    from crushkv.cli import build_parser

    assert build_parser().parse_args(["bench", "--defer-bytes", "0"]).defer_bytes == 0


def test_compress_rejects_a_negative_defer_bytes():
    import crushkv

    model = tiny_llama()
    with pytest.raises(ValueError, match="defer_bytes"), crushkv.compress(model, "h2o:budget=64", defer_bytes=-1):
        pass


def test_cuda_plumbing_synchronises_and_reads_allocator_peaks(monkeypatch):
    """Without a GPU here: on a CUDA device the timers synchronise and peak memory comes from the allocator stats
    (reset before the block, read after a synchronise), never from the process RSS."""
    from crushkv.bench import memory, timing

    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("sync"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 100)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: calls.append("peak") or 1234)
    monkeypatch.setattr(memory, "_status_kb", lambda field: pytest.fail("RSS read on a CUDA device"))
    cuda = torch.device("cuda", 0)
    with memory.peak_memory(cuda) as mem:
        calls.append("work")
    assert calls == ["sync", "reset", "work", "sync", "peak"]
    assert (mem.kind, mem.base, mem.peak) == ("cuda_max_memory_allocated", 100, 1234)
    calls.clear()
    timing._sync(cuda)
    timing._sync(torch.device("cpu"))
    assert calls == ["sync"]


def test_the_4k_target_names_the_length_it_is_checked_at(report):
    """A run without 4k checks the prefill-scoring target at its closest length and its name says so."""
    from crushkv.bench.runner import check_targets

    def scoring(targets):
        return {(t["target"], t["length"]) for t in targets if "score collection" in t["target"]}

    assert scoring(report["targets"]) == {("score collection <= 10% of prefill at 128 (closest to the 4k target)", 128)}
    at_4k = [dict(c, length=4096 if c["length"] == 128 else c["length"]) for c in report["cells"]]
    assert scoring(check_targets(at_4k)) == {("score collection <= 10% of prefill at 4k", 4096)}


def test_quant_speed_rows_on_a_tiny_model():
    """The quantized-slots benchmark runs every row on the same prompt (the peer row says why when quanto is not
    installed); with a residual over the length, KIVI at 8, 4 and 2 bits decodes exactly the unquantized tokens."""
    from conftest import tiny_llama
    from crushkv.bench import quant_speed

    torch.manual_seed(0)
    model = tiny_llama().eval()
    rows = quant_speed.run(model, [40], new_tokens=4, group=4, residual=64)
    names = [r["policy"].split(":")[0].split("(")[0] for r in rows]
    assert names == ["full", "full", "full", "full", "snapkv", "transformers QuantizedCache"]
    full, kivi = rows[0], rows[1:4]
    assert [next(p for p in ("int8", "int4", "int2") if f"quant={p}" in r["policy"]) for r in kivi] == [
        "int8",
        "int4",
        "int2",
    ]
    assert all(r["output_ids"] == full["output_ids"] for r in kivi)
    assert "missing" in rows[5] or len(rows[5]["output_ids"]) == 4
