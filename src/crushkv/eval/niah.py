"""Needle-in-a-haystack: a random 7-digit code hidden at a sentence boundary in Paul Graham essays.

Grid of total prompt lengths (tokens) x depths (percent). Each cell gets its own needle drawn from
``seed`` and the cell, so runs are reproducible and cells independent. The prompt ends with the answer
prefix; a hit is the needle number appearing in the (greedy, 12-token) output.
"""

from __future__ import annotations

from typing import Any

from crushkv.eval.common import (
    Example,
    Task,
    boundary_at_depth,
    chat_prompt,
    count_tokens,
    haystack,
    seeded_rng,
    split_at_last,
    truncate_tokens,
)

INTRO = "Read the following text and answer the question at the end.\n\n"
QUESTION = "\n\nQuestion: What is the secret access code for the vault? Answer with the 7-digit number only."
ANSWER_PREFIX = "The secret access code for the vault is"
NEEDLE = "The secret access code for the vault is {code}."
DEFAULT_LENGTHS = (1024, 2048)
DEFAULT_DEPTHS = (0, 25, 50, 75, 100)


def insert_at_depth(text: str, sentence: str, depth_pct: float) -> tuple[str, int]:
    """Insert ``sentence`` at the sentence boundary at/before ``depth_pct`` % of ``text``; returns (text, offset)."""
    pos = boundary_at_depth(text, depth_pct / 100.0)
    if pos == 0:
        return f"{sentence} {text}", 0
    if pos >= len(text):
        return f"{text.rstrip()} {sentence}", len(text.rstrip()) + 1
    head = text[:pos]
    if not head[-1].isspace():
        head += " "
    return f"{head}{sentence} {text[pos:]}", len(head)


def score_niah(prediction: str, needle: str) -> float:
    """Exact retrieval: 1.0 if the needle number appears in the output."""
    return float(needle in prediction)


class NIAHTask(Task):
    """Needle-in-a-haystack grid (lengths x depths)."""

    name = "niah"
    metrics = ("score",)
    primary = "score"

    def __init__(
        self,
        lengths: tuple[int, ...] = DEFAULT_LENGTHS,
        depths: tuple[float, ...] = DEFAULT_DEPTHS,
        seed: int = 1234,
        chat: bool = False,
        max_new_tokens: int = 12,
        text: str | None = None,
    ) -> None:
        self.lengths = tuple(int(x) for x in lengths)
        self.depths = tuple(float(d) for d in depths)
        if not self.lengths or min(self.lengths) < 1:
            raise ValueError(f"needle prompt lengths must be positive token counts, got {list(self.lengths)}")
        bad = [d for d in self.depths if not 0.0 <= d <= 100.0]
        if bad or not self.depths:
            raise ValueError(f"needle depths are percentages in [0, 100], got {list(self.depths)}")
        self.seed = seed
        self.chat = chat
        self.max_new_tokens = max_new_tokens
        self._text = text

    def settings(self) -> dict[str, Any]:
        return {
            "lengths": list(self.lengths),
            "depths": list(self.depths),
            "seed": self.seed,
            "chat": self.chat,
            "max_new_tokens": self.max_new_tokens,
            "needle": NEEDLE,
            "scorer": "needle number in output",
        }

    def required_data(self) -> tuple[str, ...]:
        return () if self._text is not None else ("haystack",)

    def max_positions(self) -> int:
        return max(self.lengths) + self.max_new_tokens

    def wrap(self, context: str, tokenizer: Any) -> tuple[str, int]:
        """Full prompt around ``context`` and the index where the question starts."""
        if self.chat:
            prompt = chat_prompt(tokenizer, [{"role": "user", "content": INTRO + context + QUESTION}], ANSWER_PREFIX)
        else:
            prompt = f"{INTRO}{context}{QUESTION}\nAnswer: {ANSWER_PREFIX}"
        return prompt, split_at_last(prompt, QUESTION)

    def needle_code(self, length: int, depth: float) -> str:
        return str(int(seeded_rng(self.seed, "niah", length, depth).integers(1_000_000, 10_000_000)))

    def examples(self, tokenizer: Any) -> list[Example]:
        text = self._text if self._text is not None else haystack(max_chars=max(self.lengths) * 12 + 4096)
        overhead = count_tokens(tokenizer, self.wrap("", tokenizer)[0]) + count_tokens(tokenizer, NEEDLE) + 4
        out = []
        for length in self.lengths:
            hay = truncate_tokens(tokenizer, text, length - overhead)
            for depth in self.depths:
                code = self.needle_code(length, depth)
                context, offset = insert_at_depth(hay, NEEDLE.format(code=code), depth)
                prompt, split = self.wrap(context, tokenizer)
                meta = {"length": length, "depth": depth, "needle": code, "needle_offset": offset}
                meta["actual_depth"] = round(100.0 * offset / max(len(context), 1), 2)
                ex_id = f"niah-L{length}-D{depth:g}"
                out.append(Example(id=ex_id, prompt=prompt, split=split, refs=[code], meta=meta))
        return out

    def score(self, prediction: str, example: Example) -> dict[str, float]:
        return {"score": score_niah(prediction, example.refs[0])}
