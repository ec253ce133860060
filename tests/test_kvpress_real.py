"""Agreement with the real NVIDIA kvpress where it is installed (``make test-min`` installs it; skipped elsewhere).

Same tiny random-weight model, same ids, both libraries in one process: the kept sets of identically defined methods
must agree (``crushkv.bench.kvpress_compare`` records kvpress's own top-k and crushkv's ``kept_positions``).
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import VOCAB, tiny_llama, tiny_qwen2
from crushkv.bench import kvpress_compare as kc

pytest.importorskip("kvpress")


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2"])
def test_kept_sets_agree_with_kvpress(build):
    torch.manual_seed(0)
    sdpa = build().eval()
    sdpa.set_attn_implementation("sdpa")
    eager = copy.deepcopy(sdpa)
    eager.set_attn_implementation("eager")
    ids = torch.randint(1, VOCAB, (1, 512), generator=torch.Generator().manual_seed(1))
    rows = kc.compare_same_process({"sdpa": sdpa, "eager": eager}, {512: ids}, 0.75, 1, tuple(kc.PAIRS))
    by_press = {row["press"]: row for row in rows}
    assert set(by_press) == set(kc.PAIRS)
    for row in rows:
        assert row["n_kept"] == 128 and row["layer_heads"] > 0
    assert by_press["streaming"]["jaccard_min"] == 1.0  # positions only: no floating point involved
    # column sums summed in a different order (eager weights vs crushkv's blocks): identical here, but allow one
    # near-tie swap in a head (Jaccard 127/129) so that another CPU's rounding cannot fail the test
    assert by_press["observed"]["jaccard_mean"] >= 0.999 and by_press["observed"]["jaccard_min"] >= 0.98
    # SnapKV differs only at the pooling edges (kvpress pools without the window, zero-padded; see performance.md)
    assert by_press["snapkv"]["jaccard_mean"] >= 0.95
    # attention-free and query-statistics hosts: the same definitions (floating point sums in another order)
    for press in ("expected", "keydiff"):
        assert by_press[press]["jaccard_mean"] >= 0.999, (press, by_press[press])
    # LagKV's scores are ranks within partitions, so equal scores are the rule: with 128 of 512 kept, 256 tokens
    # (sinks and the reference-less tail) tie at 1. crushkv keeps the earliest, torch.topk some other 128 of them.
    assert by_press["lagkv"]["jaccard_mean"] >= 0.9


def test_ruler_prompt_through_kvpress_answers_as_crushkv_does():
    """``crushkv.bench.kvpress_ruler`` feeds kvpress's pipeline crushkv's own token ids: with StreamingLLM (the same
    kept positions in both libraries) kvpress's greedy answer equals crushkv's question-agnostic one."""
    from transformers import pipeline

    from conftest_eval import tiny_model, tiny_tokenizer
    from crushkv.bench import kvpress_ruler
    from crushkv.eval.common import QUESTION_AGNOSTIC, generate_compressed
    from crushkv.eval.ruler import RulerTask
    from crushkv.eval.ruler_data import RulerExample, metric_for

    model, tok = tiny_model(), tiny_tokenizer()
    model.set_attn_implementation("sdpa")
    text = " ".join(f"Line {i} says the vault code is {i * 7919 % 10000:04d}." for i in range(40))
    raw = RulerExample(task="niah_single_1", index=0, context=text, question="\nWhat is the vault code of line 3?",
                       answer_prefix=" The code is", outputs=["3757"], tokens_to_generate=12,
                       metric=metric_for("niah_single_1"))  # fmt: skip
    example = RulerTask(subtasks=("niah_single_1",), lengths=(4096,), chat=True).build(raw, 4096, tok)
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tok)
    press = kvpress_ruler.make_press("streaming", 0.5)
    answer, context = kvpress_ruler.kvpress_answer(pipe, tok, example, press)
    assert context > 100
    spec = f"streaming:budget={context // 2},sink=4,phase=prefill"
    ours = generate_compressed(model, tok, example.context, example.query, spec, QUESTION_AGNOSTIC, 12)
    assert ours["kept_tokens_after_context"] == context // 2
    assert answer == ours["text"]
