"""kvpress comparison plumbing on a tiny model: settings, row fields, same-process interleaving (kvpress faked)."""

from __future__ import annotations

import inspect
import types

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import crushkv
from conftest import batch_inputs
from crushkv import attention
from crushkv.bench import kvpress_compare as kc
from crushkv.policies import parse_policy


@pytest.mark.parametrize("length", [256, 1024, 4097])
@pytest.mark.parametrize("press", sorted(kc.PAIRS))
def test_spec_reproduces_kvpress_budget(press, length):
    spec = kc.crushkv_spec(press, length, 0.75)
    policy = parse_policy(spec)
    assert spec.startswith(kc.PAIRS[press] + ":")
    assert kc.n_kept(length, 0.75) == int(length * 0.25)
    assert f"budget={kc.n_kept(length, 0.75)}," in spec and policy.phase == "prefill"


def test_make_row_ratios_and_overlap():
    run = {"press": "snapkv", "attn_implementation": "sdpa", "length": 8, "prefill_full_s": 2.0,
           "prefill_press_s": 4.0, "kept": {"0": [[0, 1], [2, 3]], "1": [[4, 5], [6, 7]]}}  # fmt: skip
    kept = [[[0, 1], [2, 3]], [[4, 5], [1, 2]]]
    row = kc.make_row(run, 0.75, crushkv_full=1.5, crushkv_s=3.0, kept=kept)
    assert row["time_ratio"] == pytest.approx(0.75)
    assert row["layer_heads"] == 4 and row["jaccard_min"] == 0.0 and row["jaccard_mean"] == pytest.approx(0.75)
    assert row["kvpress_full_s"] == 2.0 and row["crushkv_full_s"] == 1.5 and row["n_kept"] == 2


def test_kvpress_side_script_loads():
    side = kc.load_kvpress_side()  # imports kvpress lazily, so this runs without it
    assert callable(side.make_press) and callable(side.record_kept) and callable(side.prefill)
    assert set(side.PRESSES) == set(kc.PAIRS)


def test_same_process_rows_interleave_and_score(monkeypatch, arch_model):
    """A fake kvpress that keeps what crushkv keeps: Jaccard 1 everywhere, every column timed once per round."""
    _, model = arch_model
    calls: list[str] = []
    real = kc.crushkv_prefill

    def prefill(m, ids, press=None):
        calls.append("kv_press" if press else "kv_full")
        if press is not None:
            _, kept = real(m, ids, kc.crushkv_spec(press.name, ids.shape[1], press.ratio))
            press.store.update(dict(enumerate(kept)))
        return (0.5 if press else 1.0), ids.shape[1]

    def record_kept(press, store):
        press.store = store

    side = types.SimpleNamespace(
        prefill=prefill,
        make_press=lambda name, ratio: types.SimpleNamespace(name=name, ratio=ratio),
        record_kept=record_kept,
    )

    def traced(m, ids, spec):
        calls.append("cr_full" if spec == "full" else "cr")
        return real(m, ids, spec)

    monkeypatch.setattr(kc, "load_kvpress_side", lambda: side)
    monkeypatch.setattr(kc, "crushkv_prefill", traced)
    ids = torch.randint(1, 90, (1, 320), generator=torch.Generator().manual_seed(0))
    prompts = {280: ids[:, :280], 320: ids}
    rows = kc.compare_same_process({"sdpa": model, "eager": model}, prompts, 0.75, 2, ("snapkv", "streaming"))
    assert [(r["length"], r["press"]) for r in rows] == [(n, p) for n in (280, 320) for p in ("snapkv", "streaming")]
    for r in rows:
        assert r["jaccard_mean"] == 1.0 and r["jaccard_min"] == 1.0 and r["layer_heads"] > 0
        assert r["kvpress_full_s"] == 1.0 and r["kvpress_press_s"] == 0.5
        assert r["time_ratio"] == pytest.approx(r["crushkv_s"] / 0.5) and r["crushkv_full_s"] > 0
    # per (length, press): warm-up of both sides, then the four columns interleaved in every round
    assert calls == (["kv_full", "cr"] + ["kv_full", "kv_press", "cr_full", "cr"] * 2) * 4


def test_attention_function_takes_dropout_positionally_like_transformers(arch_model):
    """kvpress's attention patch wraps every registered function as ``f(module, q, k, v, mask, dropout, **kw)``."""
    ours = list(inspect.signature(attention.crushkv_attention).parameters)[:7]
    assert ours == list(inspect.signature(sdpa_attention_forward).parameters)[:7]

    def kvpress_style(module, query, key, value, attention_mask, dropout, **kwargs):
        return attention.crushkv_attention(module, query, key, value, attention_mask, dropout, **kwargs)

    _, model = arch_model
    ids, mask = batch_inputs(length=40)
    spec = "h2o:budget=16,sink=2,recent=4,phase=prefill"
    with crushkv.compress(model, spec) as cache:
        want = model(ids, attention_mask=mask, **crushkv.cache_kwargs(model, cache)).logits
    with crushkv.compress(model, spec) as cache:
        AttentionInterface.register(attention.NAME, kvpress_style)
        try:
            got = model(ids, attention_mask=mask, **crushkv.cache_kwargs(model, cache)).logits
        finally:
            attention.register()
        assert cache.kept_positions(cache.compressed_layers[0]).shape[-1] == 16
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_ruler_comparison_pairs_examples_and_counts_identical_answers(tmp_path):
    """``kvpress_ruler.compare`` pairs each press with crushkv's run of the same method on the examples both hold,
    counts identical answers, and prints dashes for a press with no common example."""
    import json

    from crushkv.bench import kvpress_ruler as kr
    from crushkv.eval import results

    model, kept = "qwen2.5-coder-0.5b", 0.25
    spec = kr.crushkv_spec("snapkv", kept)
    ours = tmp_path / "crushkv"
    ours.mkdir()
    stem = results.run_stem("ruler", model, spec, "question-agnostic")
    results.write_json(ours / f"{stem}{results.SUMMARY_SUFFIX}", {"policy": spec, "model": model})
    mine = [("a", " 123.", 1.0), ("b", " 9", 0.0), ("c", " x", 0.0)]
    (ours / f"{stem}{results.RECORDS_SUFFIX}").write_text(
        "".join(json.dumps({"id": i, "prediction": p, "score": s}) + "\n" for i, p, s in mine), encoding="utf-8"
    )
    theirs = tmp_path / "kvpress"
    theirs.mkdir()
    press = [("a", "123.", 1.0), ("b", " 7", 1.0), ("d", " 1", 1.0)]  # "d": crushkv never ran it
    (theirs / f"{kr.run_name(model, 'snapkv', kept)}{results.RECORDS_SUFFIX}").write_text(
        "".join(json.dumps({"id": i, "prediction": p, "score": s}) + "\n" for i, p, s in press), encoding="utf-8"
    )
    rows = kr.compare(theirs, ours, ["snapkv", "kvzip"], kept, model)
    snap, kvzip = rows
    assert (snap["n"], snap["wins"], snap["losses"], snap["same_answer"]) == (2, 1, 0, 1)
    assert (snap["kvpress_score"], snap["crushkv_score"]) == (1.0, 0.5)
    assert kvzip["n"] == 0
    table = kr.format_rows(rows).splitlines()
    assert "| 1 of 2 |" in table[2] and "KVzipPress" in table[3] and table[3].endswith("| – | – | – | – | – |")
