"""Shared context forwards in `crushkv eval`: records equal separate runs, resume across both, and when it applies."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

import crushkv.models
from conftest_eval import fake_load_model, patch_data
from crushkv.cli import main
from crushkv.eval import results
from crushkv.eval.common import QUERY_AWARE, QUESTION_AGNOSTIC
from crushkv.eval.niah import NIAHTask
from crushkv.eval.ppl import PPLTask
from crushkv.eval.runner import can_share
from policy_matrix import all_specs

ARGS = ["--model", "test/tiny", "--task", "niah", "--lengths", "96", "--depths", "0,50,100", "--max-new-tokens", "4"]
ARGS += ["--compression", QUESTION_AGNOSTIC, "--no-progress"]
# fields that measure time (the rest of a record must match exactly)
TIMING = {"time_s", "ttft_s", "decode_tok_s", "prefill_s", "prefill_forwards", "reconstructions", "forks"}
SPECS = all_specs(24)  # every policy, each under every KVCrush and Ada-KV variant


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    patch_data(monkeypatch)
    monkeypatch.setattr(crushkv.models, "load_model", fake_load_model)


def _policies(specs: list[str]) -> list[str]:
    return [arg for spec in specs for arg in ("--policy", spec)]


def _records(out: Path) -> dict[tuple[str, str], dict]:
    rows = {}
    for path in out.glob("*" + results.RECORDS_SUFFIX):
        for r in results.read_records(path):
            rows[r["policy"], r["id"]] = {k: v for k, v in r.items() if k not in TIMING}
    return rows


def test_shared_forwards_equal_separate_runs_for_every_policy(tmp_path: Path, capsys) -> None:
    shared, separate = tmp_path / "shared", tmp_path / "separate"
    assert main(["eval", *ARGS, *_policies(SPECS), "--out", str(shared)]) == 0
    out = capsys.readouterr().out
    assert "shared context forwards:" in out  # the shared path ran
    assert main(["eval", *ARGS, *_policies(SPECS), "--out", str(separate), "--no-shared-prefill"]) == 0
    assert "shared context forwards:" not in capsys.readouterr().out
    got, want = _records(shared), _records(separate)
    assert len(want) == 3 * len(SPECS)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == want[key], key  # predictions, scores, kept tokens and bytes after the context and at the end
    record = next(iter(results.read_records(next(shared.glob("*" + results.RECORDS_SUFFIX)))))
    assert record["forks"] == len(SPECS) and 1 <= record["prefill_forwards"] <= 2


def test_a_shared_run_resumes_separate_runs_and_skips_done_examples(tmp_path: Path, capsys) -> None:
    specs = ["full", "snapkv:budget=32,window=4", "h2o+kvcrush:budget=32,crush=8,recent=4"]
    first = ["eval", *ARGS, "--limit", "1", *_policies(specs[:2]), "--out", str(tmp_path), "--no-shared-prefill"]
    assert main(first) == 0
    assert main(["eval", *ARGS, *_policies(specs), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    # 3 examples: the first two policies had one done, the third none -> 1 + 3 + 3 forks; H2O's exact statistics
    # take another output path than SDPA's (``fork.prompt_path``): 1 forward for the first example, 2 for the others
    assert "shared context forwards: 5 for 7 policy-examples" in out
    for path in tmp_path.glob("*" + results.SUMMARY_SUFFIX):
        summary = json.loads(path.read_text())
        assert summary["n"] == 3 and summary["status"] == "complete"
    for path in tmp_path.glob("*" + results.RECORDS_SUFFIX):
        ids = [r["id"] for r in results.read_records(path)]
        assert len(ids) == 3 == len(set(ids))  # nothing evaluated twice


def test_when_sharing_applies() -> None:
    niah = NIAHTask(lengths=(96,), depths=(0.5,))
    assert can_share(niah, QUESTION_AGNOSTIC, 2, 1)
    assert not can_share(niah, QUESTION_AGNOSTIC, 1, 1)  # nothing to share
    assert not can_share(niah, QUERY_AWARE, 2, 1)  # the question is part of the compressed prompt
    assert not can_share(niah, QUESTION_AGNOSTIC, 2, 4)  # batched runs are left-padded
    assert not can_share(PPLTask(length=16, docs=1), QUESTION_AGNOSTIC, 2, 1)


def test_a_prefilled_cache_must_belong_to_the_policy() -> None:
    from crushkv.eval.common import generate_compressed
    from crushkv.fork import prefill_forks
    from crushkv.policies import parse_policy

    model, tokenizer = fake_load_model("test/tiny")
    ids = tokenizer("startup founders often think about money", return_tensors="pt").input_ids
    (cache,), timing = prefill_forks(model, ["snapkv:budget=4,window=2,sink=1,recent=2"], ids)
    shared = {"prefill_s": timing["prefill_s"], "prefill_forwards": 1, "forks": 1}
    with pytest.raises(ValueError, match="made for"):
        other = parse_policy("h2o:budget=4,sink=1,recent=2")
        generate_compressed(model, tokenizer, "a", "b", other, QUESTION_AGNOSTIC, 2, prefilled=(cache, shared))
    with pytest.raises(ValueError, match="question-agnostic"):
        generate_compressed(model, tokenizer, "a", "b", cache.policy, QUERY_AWARE, 2, prefilled=(cache, shared))


def test_forks_decoded_one_per_batch_equal_generate_for_every_policy() -> None:
    """``generate_forks``' own greedy loop (argmax, EOS, rows leaving when they stop) gives every policy exactly
    what ``generate`` gives it from the same fork: text, token counts, kept tokens and bytes. Two EOS ids that the
    runs meet at different steps make rows stop early."""
    from crushkv.eval.common import generate_compressed, generate_forks
    from crushkv.fork import prefill_forks
    from crushkv.policies import parse_policy

    model, tok = fake_load_model("test/tiny")
    context, query = "startup founders often think about money and time " * 6, " what do founders think about?"
    ids = tok(context, return_tensors="pt").input_ids
    policies = [parse_policy(s) for s in SPECS]
    forks, timing = prefill_forks(model, policies, ids)
    shared = {"prefill_s": timing["prefill_s"], "prefill_forwards": timing["forwards"], "forks": len(forks)}
    probe = generate_forks(model, tok, context, query, forks, shared, 10)  # what the rows say without EOS
    seen = Counter(t for g in probe for t in tok(g["text"], add_special_tokens=False).input_ids[1:6])
    model.generation_config.eos_token_id = [t for t, _ in seen.most_common(2)]
    forks, _ = prefill_forks(model, policies, ids)
    alone = [generate_forks(model, tok, context, query, [cache], shared, 10)[0] for cache in forks]
    forks, _ = prefill_forks(model, policies, ids)
    want = [generate_compressed(model, tok, context, query, p, QUESTION_AGNOSTIC, 10, prefilled=(c, shared))
            for p, c in zip(policies, forks)]  # fmt: skip
    assert len({w["new_tokens"] for w in want}) > 1  # some rows stopped before others
    for spec, got, ref in zip(SPECS, alone, want):
        assert got.pop("decode_batch") == 1
        untimed = {k: v for k, v in ref.items() if k not in TIMING}
        assert {k: v for k, v in got.items() if k not in TIMING} == untimed, spec


def test_forks_decoded_together_match_separate_runs(tmp_path: Path) -> None:
    """``--decode-batch 7``: the forks of each example decoded as rows of one batch. Everything up to the question
    is each cache's own (fields after the context equal separate runs exactly); the decoded text may differ only
    where a batched matmul's rounding breaks a near-tie of the random tiny model, which is rare."""
    batched, separate = tmp_path / "batched", tmp_path / "separate"
    longer = [*ARGS[:-5], "--max-new-tokens", "12", *ARGS[-3:]]
    assert main(["eval", *longer, *_policies(SPECS), "--out", str(batched), "--decode-batch", "7"]) == 0
    assert main(["eval", *longer, *_policies(SPECS), "--out", str(separate), "--no-shared-prefill"]) == 0
    got, want = _records(batched), _records(separate)
    assert got.keys() == want.keys() and len(want) == 3 * len(SPECS)
    same = 0
    for key in want:
        row = dict(got[key])
        assert row.pop("decode_batch") in (7, len(SPECS) % 7)  # the last group takes the rest
        for field in row:
            if field.endswith("_after_context") or field in ("context_tokens", "prompt_tokens", "refs"):
                assert row[field] == want[key][field], (key, field)
        same += row == want[key]
    assert same >= 0.97 * len(want), f"{same} of {len(want)} records equal"


def test_forks_refuse_a_generation_config_with_logits_processors() -> None:
    from crushkv.eval.common import generate_forks
    from crushkv.fork import StackedRows, prefill_forks

    model, tok = fake_load_model("test/tiny")
    ids = tok("startup founders often think about money", return_tensors="pt").input_ids
    forks, _ = prefill_forks(model, ["full", "snapkv:budget=4,window=2,sink=1,recent=2"], ids)
    model.generation_config.repetition_penalty = 1.2
    with pytest.raises(ValueError, match="repetition_penalty"):
        generate_forks(model, tok, "a", "b", forks, {"prefill_s": 0.0}, 2)
    with pytest.raises(ValueError, match="one prompt length"):
        other, _ = prefill_forks(model, ["full"], ids[:, :-1])
        StackedRows([forks[0], *other])
