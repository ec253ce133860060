"""Helpers for the evaluation tests: an offline byte-level BPE tokenizer, a tiny Llama, fake haystack and GSM8K data.

Imported by ``tests/test_eval_*.py`` (plain functions cached with ``lru_cache``, not fixtures).
"""

from __future__ import annotations

import functools
import random

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

torch.set_num_threads(1)

_WORDS = [
    "startup",
    "founders",
    "often",
    "think",
    "about",
    "money",
    "while",
    "users",
    "care",
    "about",
    "things",
    "that",
    "work",
    "well",
    "and",
    "investors",
    "look",
    "for",
    "growth",
    "in",
    "markets",
    "where",
    "nobody",
    "expected",
    "anything",
    "important",
    "to",
    "happen",
    "before",
    "the",
    "idea",
    "became",
    "obvious",
    "to",
    "everyone",
    "who",
    "had",
    "watched",
    "programmers",
    "build",
    "tools",
    "for",
    "themselves",
    "during",
    "long",
    "nights",
]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def make_haystack(n_sentences: int = 600, seed: int = 0) -> str:
    """Deterministic essay-like text: sentences of 6-14 words, paragraphs of 5 sentences."""
    rng = random.Random(seed)
    sentences = []
    for i in range(n_sentences):
        words = rng.choices(_WORDS, k=rng.randint(6, 14))
        sentence = " ".join(words).capitalize() + "."
        sentences.append(sentence + ("\n\n" if i % 5 == 4 else " "))
    return "".join(sentences).strip()


HAYSTACK = make_haystack()

GSM8K_ITEMS = [
    {
        "question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
        "answer": f"Tom has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}",
    }
    for a, b in [(3, 4), (10, 5), (7, 8), (1, 1), (20, 22), (6, 6), (9, 1), (2, 30), (12, 13), (4, 4), (5, 50), (8, 9)]
]


@functools.lru_cache(maxsize=1)
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (vocab 400) trained in-process; adds <s> at the start; has a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [HAYSTACK, "Question: Answer: The secret access code for the vault is 0123456789."]
    corpus += [it["question"] + " " + it["answer"] for it in GSM8K_ITEMS]
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    """2-layer Llama (hidden 64, GQA 4/2) with random weights, eval mode."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tiny_tokenizer()),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()


def fake_load_model(name: str, dtype: object = None, attn_implementation: str = "sdpa", **_: object) -> tuple:
    """Stand-in for ``crushkv.load_model`` used by the CLI tests."""
    return tiny_model(), tiny_tokenizer()


def patch_data(monkeypatch: object) -> None:
    """Point ``crushkv.data`` at the synthetic haystack and GSM8K items."""
    import crushkv.data

    monkeypatch.setattr(crushkv.data, "haystack_text", lambda **_: HAYSTACK)

    def gsm8k(split: str = "test", **_: object) -> list[dict[str, str]]:
        if split != "test":
            raise ValueError("no such split")
        return list(GSM8K_ITEMS)

    monkeypatch.setattr(crushkv.data, "gsm8k", gsm8k)
    # the synthetic data needs no package: never pip-install from a test (tests/test_data.py covers ensure_data)
    monkeypatch.setattr(crushkv.data, "ensure_data", lambda names, **_: None)
