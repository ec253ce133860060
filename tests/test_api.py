"""``crushkv.cache_kwargs``: the cache reaches ``forward``/``generate`` under this transformers version's name."""

from __future__ import annotations

import inspect
import warnings

import torch

import crushkv
from conftest import batch_inputs


def test_cache_kwargs_names_the_forward_argument_and_the_cache_is_used(arch_model):
    _, model = arch_model
    (name,) = crushkv.cache_kwargs(model, None)
    assert name in inspect.signature(type(model).forward).parameters
    ids, mask = batch_inputs(batch=1, length=24, pad=0)
    with warnings.catch_warnings(record=True) as caught, crushkv.compress(model, "h2o:budget=12,sink=2,recent=4") as c:
        warnings.simplefilter("always")
        model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, **crushkv.cache_kwargs(model, c))
        with torch.no_grad():
            model(ids[:, :1], **crushkv.cache_kwargs(model, c))
    # the compressed cache really was the one in use: every compressed layer is at its budget
    assert {c.kept_tokens()[i] for i in c.compressed_layers} == {12}
    assert c.get_seq_length() == 24 + 3 - 1 + 1
    assert not [w for w in caught if "past_key_values" in str(w.message)]
