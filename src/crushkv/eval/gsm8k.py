"""GSM8K as lm-evaluation-harness ``gsm8k`` v3: 5-shot "Question/Answer" prompt, strict and flexible exact match.

Few-shot examples: lm-eval samples them from the *train* split, which is not available offline. The shots are
therefore the first ``num_fewshot`` of the 8 test items reserved by ``crushkv.data.GSM8K_FEWSHOT_INDICES``
(1290-1297); all 8 reserved items are excluded from scoring (1,311 scored items). The same shots precede every
question. If a train split ever appears, 5 train items drawn once with ``seed`` are used instead.
"""

from __future__ import annotations

import random
import re
from typing import Any

from crushkv.eval.common import Example, Task, chat_prompt, split_at_last

FALLBACK_SHOT_IDS = tuple(range(1290, 1298))
STRICT_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE_RE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
REGEXES_TO_IGNORE = (",", "\\$", "(?s).*#### ", "\\.$")
STOP = ("Question:", "</s>", "<|im_end|>")
INVALID = "[invalid]"


def regex_extract(text: str, pattern: re.Pattern[str], group_select: int = 0, fallback: str = INVALID) -> str:
    """lm-eval ``RegexFilter``: findall, pick match ``group_select``, first non-empty group of a tuple, strip."""
    matches = pattern.findall(text)
    if not matches:
        return fallback
    match = matches[group_select]
    if isinstance(match, tuple):
        groups = [m for m in match if m]
        if not groups:
            return fallback
        match = groups[0]
    return match.strip()


def strict_extract(text: str) -> str:
    return regex_extract(text, STRICT_RE, 0)


def flexible_extract(text: str) -> str:
    return regex_extract(text, FLEXIBLE_RE, -1)


def normalize(text: str) -> str:
    """``exact_match`` preprocessing: drop ``regexes_to_ignore`` (in order), then lower-case."""
    for pattern in REGEXES_TO_IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def score_gsm8k(completion: str, reference: str) -> dict[str, Any]:
    """Strict-match and flexible-extract exact match of one completion against the full reference answer."""
    strict = strict_extract(completion)
    flexible = flexible_extract(completion)
    return {
        "strict": exact_match(strict, reference),
        "flexible": exact_match(flexible, reference),
        "strict_extracted": strict,
        "flexible_extracted": flexible,
    }


def load_items(split: str) -> list[dict[str, str]] | None:
    """GSM8K items from ``crushkv.data``; None if that split is not shipped."""
    from crushkv import data

    try:
        items = data.gsm8k(split)
    except (FileNotFoundError, KeyError, ValueError):
        return None
    return list(items) if items else None


def reserved_shot_ids(n_items: int) -> tuple[int, ...]:
    """Test indices reserved for few-shot prompts (``crushkv.data.GSM8K_FEWSHOT_INDICES``; last 8 of short lists)."""
    try:
        from crushkv.data import GSM8K_FEWSHOT_INDICES as reserved
    except ImportError:
        reserved = FALLBACK_SHOT_IDS
    if max(reserved) < n_items:
        return tuple(reserved)
    return tuple(range(max(n_items - len(reserved), 0), n_items))


def doc_to_text(question: str) -> str:
    return f"Question: {question}\nAnswer:"


class GSM8KTask(Task):
    """lm-eval gsm8k v3 (5-shot, greedy, until "Question:")."""

    name = "gsm8k"
    metrics = ("strict", "flexible")
    primary = "flexible"
    stop_strings = STOP

    def __init__(
        self,
        num_fewshot: int = 5,
        chat: bool = False,
        max_new_tokens: int = 256,
        seed: int = 1234,
        items: list[dict[str, str]] | None = None,
        shots: list[dict[str, str]] | None = None,
    ) -> None:
        self.num_fewshot = num_fewshot
        self.chat = chat
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self._items = items
        self._shots = shots
        self.shot_source = "given" if shots is not None else None

    def settings(self) -> dict[str, Any]:
        self._load()
        return {
            "max_new_tokens": self.max_new_tokens,
            "num_fewshot": self.num_fewshot,
            "chat": self.chat,
            "seed": self.seed,
            "shot_source": self.shot_source,
            "stop": list(self.stop_strings),
        }

    def required_data(self) -> tuple[str, ...]:
        return () if self._items is not None else ("gsm8k",)

    def _load(self) -> tuple[list[tuple[int, dict[str, str]]], list[dict[str, str]]]:
        """(scored (index, item) pairs, few-shot items); computed once."""
        if getattr(self, "_loaded", None) is None:
            self._loaded = self._select()
        return self._loaded

    def _select(self) -> tuple[list[tuple[int, dict[str, str]]], list[dict[str, str]]]:
        items = self._items if self._items is not None else load_items("test")
        if not items:
            raise RuntimeError("crushkv.data.gsm8k('test') returned nothing")
        if self._shots is not None:
            return list(enumerate(items)), self._shots[: self.num_fewshot]
        train = load_items("train") if self._items is None else None
        if train:  # not shipped offline today; lm-eval's source of shots when it is
            self.shot_source = f"train: {self.num_fewshot} items drawn with seed {self.seed}"
            return list(enumerate(items)), random.Random(self.seed).sample(train, self.num_fewshot)
        reserved = reserved_shot_ids(len(items))
        if self.num_fewshot > len(reserved):
            raise ValueError(f"at most {len(reserved)} few-shot examples are reserved, asked for {self.num_fewshot}")
        shot_ids = reserved[: self.num_fewshot]
        self.shot_source = f"test items {list(shot_ids)}; reserved items {list(reserved)} are not scored"
        excluded = set(reserved)
        return [(i, it) for i, it in enumerate(items) if i not in excluded], [items[i] for i in shot_ids]

    def build_prompt(self, question: str, shots: list[dict[str, str]], tokenizer: Any = None) -> tuple[str, int]:
        """Prompt text and the character index where the scored question starts."""
        if self.chat:
            messages: list[dict[str, str]] = []
            for shot in shots:
                messages.append({"role": "user", "content": doc_to_text(shot["question"])})
                messages.append({"role": "assistant", "content": shot["answer"]})
            messages.append({"role": "user", "content": doc_to_text(question)})
            prompt = chat_prompt(tokenizer, messages)
            return prompt, split_at_last(prompt, doc_to_text(question))
        prefix = "".join(f"{doc_to_text(s['question'])} {s['answer']}\n\n" for s in shots)
        return prefix + doc_to_text(question), len(prefix)

    def examples(self, tokenizer: Any) -> list[Example]:
        scored, shots = self._load()
        out = []
        for idx, item in scored:
            prompt, split = self.build_prompt(item["question"], shots, tokenizer)
            meta = {"index": idx}
            out.append(Example(id=f"gsm8k-{idx}", prompt=prompt, split=split, refs=[item["answer"]], meta=meta))
        return out

    def score(self, prediction: str, example: Example) -> dict[str, Any]:
        return score_gsm8k(prediction, example.refs[0])
