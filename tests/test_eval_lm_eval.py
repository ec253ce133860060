"""lm-evaluation-harness integration: the ``crushkv`` model on a local 5-question generation task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest_eval import GSM8K_ITEMS, tiny_model, tiny_tokenizer

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")

TASK_YAML = """\
task: crushkv_tiny_gsm
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["Question:"]
  do_sample: false
  max_gen_toks: 6
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def test_crushkv_model_on_local_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    from lm_eval import simple_evaluate
    from lm_eval.api import registry
    from lm_eval.tasks import TaskManager

    from crushkv.eval.lm_eval_plugin import register

    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in GSM8K_ITEMS[:5]))
    (tmp_path / "task.yaml").write_text(TASK_YAML.format(data=data))

    cls = register()
    assert registry.get_model("crushkv") is cls
    lm = cls(pretrained=tiny_model(), tokenizer=tiny_tokenizer(), policy="h2o:budget=32;recent=8", batch_size=1)
    assert lm.policy.spec.startswith("h2o:budget=32")
    seen: list[str] = []
    generate = lm.model.generate

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(type(kwargs.get("cache", kwargs.get("past_key_values"))).__name__)
        return generate(*args, **kwargs)

    monkeypatch.setattr(lm.model, "generate", spy)
    out = simple_evaluate(model=lm, tasks=["crushkv_tiny_gsm"], task_manager=TaskManager(include_path=str(tmp_path)))
    assert seen == ["CrushCache"] * 5
    assert "exact_match,none" in out["results"]["crushkv_tiny_gsm"]
