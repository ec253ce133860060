"""``ruler-lite``: crushkv's own RULER-style synthetic tasks over the Paul Graham haystack, scored like RULER.

Kept for the results recorded with them (docs/evaluation.md) and as a dependency-free smoke task; the benchmark is
NVIDIA's own RULER (``crushkv.eval.ruler``, task ``ruler``).

Sub-tasks: ``niah_single`` (one key/value needle), ``niah_multikey`` (target + 3 distractor keys),
``niah_multivalue`` (4 values for one key), ``vt`` (variable tracking, 1 chain of 4 hops), ``cwe`` (10 common words in
a numbered word list), ``fwe`` (3 most frequent words of a Zipf(2) word stream). Keys and words come from the haystack
vocabulary; values are random numbers. Metric: ``string_match_all`` (fraction of references contained in the
prediction, case-insensitive) for all of them; RULER uses ``string_match_part`` only for its QA tasks (not built here),
it is recorded too.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from typing import Any

from crushkv.eval.common import (
    Example,
    Task,
    boundary_at_depth,
    chat_prompt,
    count_tokens,
    haystack,
    seeded_rng,
    sentence_boundaries,
    split_at_last,
    task_means,
    truncate_tokens,
)

SUBTASKS = ("niah_single", "niah_multikey", "niah_multivalue", "vt", "cwe", "fwe")
MAX_NEW_TOKENS = {"niah_single": 128, "niah_multikey": 128, "niah_multivalue": 128, "vt": 30, "cwe": 120, "fwe": 50}
DEFAULT_LENGTHS = (1024,)
_CONTROL = re.compile(r"[\x00-\x1f]")


# -------------------------------------------------------------------------------------------------------------- scoring


def clean_prediction(prediction: str) -> str:
    """RULER post-processing: control characters become newlines, then strip."""
    return _CONTROL.sub("\n", prediction).strip()


def string_match_all(prediction: str, refs: list[str]) -> float:
    """Fraction of references contained in the prediction (case-insensitive)."""
    pred = clean_prediction(prediction).lower()
    return sum(r.lower() in pred for r in refs) / len(refs) if refs else 0.0


def string_match_part(prediction: str, refs: list[str]) -> float:
    """1.0 if any reference is contained in the prediction (case-insensitive)."""
    pred = clean_prediction(prediction).lower()
    return float(any(r.lower() in pred for r in refs))


# ------------------------------------------------------------------------------------------------------------- building


def insert_many(text: str, sentences: list[str], depths: list[float]) -> str:
    """Insert sentences at the sentence boundaries at/before the given depths (0..1) of the original text, in order."""
    placed = sorted(((boundary_at_depth(text, d), i) for i, d in enumerate(depths)))
    parts, last = [], 0
    for pos, i in placed:
        parts.append(text[last:pos])
        if parts[-1] and not parts[-1][-1].isspace():
            parts.append(" ")
        parts.append(sentences[i] + " ")
        last = pos
    parts.append(text[last:])
    return "".join(parts).strip()


def vocabulary(text: str) -> list[str]:
    """Sorted distinct lower-case words of at least 4 letters."""
    return sorted(set(re.findall(r"[a-z]{4,}", text.lower())))


def _fit(build: Callable[[int], str], tokenizer: Any, budget: int, hi: int) -> int:
    """Largest n in [0, hi] with count_tokens(build(n)) <= budget (build is monotone in n)."""
    lo = 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_tokens(tokenizer, build(mid)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


class RulerTask(Task):
    """RULER-style tasks at chosen total prompt lengths."""

    name = "ruler-lite"
    primary = "score"

    def __init__(
        self,
        subtasks: tuple[str, ...] = SUBTASKS,
        lengths: tuple[int, ...] = DEFAULT_LENGTHS,
        samples: int = 5,
        seed: int = 1234,
        chat: bool = False,
        text: str | None = None,
    ) -> None:
        unknown = set(subtasks) - set(SUBTASKS)
        if unknown:
            raise ValueError(f"unknown RULER sub-task(s) {sorted(unknown)}; choose from {SUBTASKS}")
        self.subtasks = tuple(subtasks)
        self.lengths = tuple(int(x) for x in lengths)
        self.samples = samples
        self.seed = seed
        self.chat = chat
        self._text = text
        self.metrics = ("score", "string_match_all", "string_match_part")
        self.max_new_tokens = max(MAX_NEW_TOKENS[s] for s in self.subtasks)

    def required_data(self) -> tuple[str, ...]:
        return () if self._text is not None else ("haystack",)

    def max_positions(self) -> int:
        return max(self.lengths) + self.max_new_tokens

    def settings(self) -> dict[str, Any]:
        return {
            "subtasks": list(self.subtasks),
            "lengths": list(self.lengths),
            "samples": self.samples,
            "seed": self.seed,
            "chat": self.chat,
            "max_new_tokens": {s: MAX_NEW_TOKENS[s] for s in self.subtasks},
            "metric": "string_match_all",
        }

    # prompt assembly -------------------------------------------------------------------------------------------------

    def wrap(self, intro: str, context: str, question: str, answer_prefix: str, tokenizer: Any) -> tuple[str, int]:
        if self.chat:
            prompt = chat_prompt(tokenizer, [{"role": "user", "content": intro + context + question}], answer_prefix)
        else:
            prompt = f"{intro}{context}{question}\nAnswer: {answer_prefix}"
        return prompt, split_at_last(prompt, question)

    def _hay(self, text: str, rng: Any, budget: int, tokenizer: Any) -> str:
        """A haystack slice of at most ``budget`` tokens starting at a random sentence in the first half."""
        starts = [b for b in sentence_boundaries(text[: len(text) // 2]) if b < len(text) // 2]
        start = int(starts[int(rng.integers(0, len(starts)))]) if len(starts) > 1 else 0
        return truncate_tokens(tokenizer, text[start:], budget)

    def _needles(self, sub: str, text: str, words: list[str], rng: Any, length: int, tokenizer: Any) -> dict[str, Any]:
        def key() -> str:
            a, b = rng.choice(len(words), 2, replace=False)
            return f"{words[a]}-{words[b]}"

        def number() -> str:
            return str(int(rng.integers(1_000_000, 10_000_000)))

        target = key()
        if sub == "niah_multivalue":
            values = [number() for _ in range(4)]
            needles = [f"One of the special magic numbers for {target} is: {v}." for v in values]
            refs = values
        else:
            value = number()
            needles = [f"One of the special magic numbers for {target} is: {value}."]
            refs = [value]
            if sub == "niah_multikey":
                needles += [f"One of the special magic numbers for {key()} is: {number()}." for _ in range(3)]
        intro = (
            "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
            "I will quiz you about the numbers afterwards.\n\n"
        )
        question = f"\n\nQuestion: What are all the special magic numbers for {target} mentioned in the provided text?"
        answer = f"The special magic numbers for {target} mentioned in the provided text are"
        overhead = count_tokens(tokenizer, self.wrap(intro, "", question, answer, tokenizer)[0])
        overhead += sum(count_tokens(tokenizer, n) + 1 for n in needles) + 4
        hay = self._hay(text, rng, length - overhead, tokenizer)
        depths = [float(d) for d in rng.uniform(0.0, 1.0, len(needles))]
        return {
            "intro": intro,
            "context": insert_many(hay, needles, depths),
            "question": question,
            "answer": answer,
            "refs": refs,
        }

    def _vt(self, text: str, rng: Any, length: int, tokenizer: Any, hops: int = 4) -> dict[str, Any]:
        letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
        names: list[str] = []
        while len(names) < hops + 1:
            name = "".join(letters[int(i)] for i in rng.integers(0, 26, 5))
            if name not in names:
                names.append(name)
        value = str(int(rng.integers(10_000, 100_000)))
        chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, hops + 1)]
        intro = "Memorize and track the chain of variable assignments hidden in the following text.\n\n"
        question = f"\n\nQuestion: Find all variables that are assigned the value {value} in the text above."
        answer = (
            f"According to the chain of variable assignments in the text above, {hops + 1} variables are assigned "
            f"the value {value}, they are:"
        )
        overhead = count_tokens(tokenizer, self.wrap(intro, "", question, answer, tokenizer)[0])
        overhead += sum(count_tokens(tokenizer, c) + 1 for c in chain) + 4
        hay = self._hay(text, rng, length - overhead, tokenizer)
        depths = sorted(float(d) for d in rng.uniform(0.0, 1.0, len(chain)))
        return {
            "intro": intro,
            "context": insert_many(hay, chain, depths),
            "question": question,
            "answer": answer,
            "refs": names,
        }

    def _cwe(self, words: list[str], rng: Any, length: int, tokenizer: Any) -> dict[str, Any]:
        n_common, freq_uncommon = 10, 3
        pool = [words[int(i)] for i in rng.permutation(len(words))]
        common, rare = pool[:n_common], pool[n_common:]
        intro = (
            "Below is a numbered list of words. In these words, some appear more often than others. "
            "Memorize the ones that appear most often.\n"
        )
        question = f"\nQuestion: What are the {n_common} most common words in the above list?"
        answer = f"The top {n_common} words that appear most often in the list are:"
        order = rng.random(len(rare) * freq_uncommon + n_common * 30)

        def listing(freq_common: int, n_rare: int) -> str:
            items = common * freq_common + rare[:n_rare] * freq_uncommon
            keys = order[: len(items)]
            shuffled = [w for _, w in sorted(zip(keys, items), key=lambda t: t[0])]
            return " ".join(f"{i + 1}. {w}" for i, w in enumerate(shuffled))

        def prompt(ctx: str) -> str:
            return self.wrap(intro, ctx, question, answer, tokenizer)[0]

        freq_common = 30
        while freq_common > freq_uncommon + 1 and count_tokens(tokenizer, prompt(listing(freq_common, 0))) > length:
            freq_common -= 1
        n_rare = _fit(lambda n: prompt(listing(freq_common, n)), tokenizer, length, len(rare))
        return {
            "intro": intro,
            "context": listing(freq_common, n_rare),
            "question": question,
            "answer": answer,
            "refs": common,
            "freq_common": freq_common,
            "n_uncommon": n_rare,
        }

    def _fwe(self, words: list[str], rng: Any, length: int, tokenizer: Any, alpha: float = 2.0) -> dict[str, Any]:
        vocab = [words[int(i)] for i in rng.permutation(len(words))[: min(len(words), 500)]]
        ranks = rng.zipf(alpha, 20 * length)
        stream = [vocab[int(r) - 1] for r in ranks if r <= len(vocab)]
        intro = (
            "Read the following coded text and track the frequency of each coded word. "
            "Find the three most frequently appeared coded words.\n\n"
        )
        question = "\n\nQuestion: What are the three most frequently appeared words in the above coded text?"
        answer = "According to the coded text above, the three most frequently appeared words are:"
        n = _fit(
            lambda k: self.wrap(intro, " ".join(stream[:k]), question, answer, tokenizer)[0],
            tokenizer,
            length,
            len(stream),
        )
        refs = [w for w, _ in Counter(stream[:n]).most_common(3)]
        return {
            "intro": intro,
            "context": " ".join(stream[:n]),
            "question": question,
            "answer": answer,
            "refs": refs,
            "n_words": n,
        }

    def build(self, sub: str, length: int, index: int, tokenizer: Any, text: str, words: list[str]) -> Example:
        rng = seeded_rng(self.seed, "ruler", sub, length, index)
        if sub.startswith("niah"):
            parts = self._needles(sub, text, words, rng, length, tokenizer)
        elif sub == "vt":
            parts = self._vt(text, rng, length, tokenizer)
        elif sub == "cwe":
            parts = self._cwe(words, rng, length, tokenizer)
        else:
            parts = self._fwe(words, rng, length, tokenizer)
        prompt, split = self.wrap(
            parts.pop("intro"), parts.pop("context"), parts.pop("question"), parts.pop("answer"), tokenizer
        )
        refs = parts.pop("refs")
        meta = {"subtask": sub, "length": length, "sample": index, "max_new_tokens": MAX_NEW_TOKENS[sub], **parts}
        return Example(id=f"ruler-{sub}-L{length}-{index}", prompt=prompt, split=split, refs=refs, meta=meta)

    def examples(self, tokenizer: Any) -> list[Example]:
        text = self._text if self._text is not None else haystack()
        words = vocabulary(text)
        # interleaved so that --limit covers every sub-task and length
        return [
            self.build(sub, length, i, tokenizer, text, words)
            for i in range(self.samples)
            for length in self.lengths
            for sub in self.subtasks
        ]

    def score(self, prediction: str, example: Example) -> dict[str, float]:
        sma = string_match_all(prediction, example.refs)
        return {"score": sma, "string_match_all": sma, "string_match_part": string_match_part(prediction, example.refs)}

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, float]:
        """Per sub-task means, per length means, and ``score`` = the average over sub-tasks (like RULER)."""
        out = task_means(records, self.subtasks)
        for metric in ("string_match_all", "string_match_part"):
            vals = [float(r[metric]) for r in records if metric in r]
            if vals:
                out[metric] = sum(vals) / len(vals)
        return out
