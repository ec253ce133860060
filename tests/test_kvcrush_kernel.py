"""The compiled KVCrush selection (``crushkv.kvcrush_reps``) against the PyTorch-op path, on random layers.

Layers as a decode step leaves them: per-head holes (evicted slots, different per KV head), free slots repeating a
position, left padding, batch 2, GQA, scores with many ties. Every anchor, pick rule and budget regime (steady
``k + 1`` candidates, ``interval``-style surplus, too few candidates) must give the same keep mask, bit for bit.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch

from crushkv import kernels
from crushkv.policies import parse_policy
from crushkv.selection import order_keys


def decode_layer(seed: int, batch: int, kv_heads: int, group: int, slots: int, holes: float, aligned: bool):
    """A ``LayerView`` of ``slots`` slots per row: tokens of positions ``[0, seen)`` in shuffled slots, a fraction
    ``holes`` of them free (their position repeats a held one), rows left-padded by 0..3 tokens."""
    gen = torch.Generator().manual_seed(seed)
    seen = slots + 40
    shape = (batch, 1 if aligned else kv_heads, slots)
    positions = torch.rand(*shape[:2], seen, generator=gen).argsort(-1)[..., :slots]
    valid = torch.rand(shape, generator=gen) >= holes
    start = torch.randint(0, 4, (batch,), generator=gen)
    valid &= positions >= start[:, None, None]  # left padding
    positions = torch.where(valid, positions, positions.roll(1, -1))  # free slots repeat a position
    positions, valid = positions.expand(batch, kv_heads, slots), valid.expand(batch, kv_heads, slots)
    # quantised scores: many ties, also at the signature medians and the host's k-th value
    score = torch.randint(0, 6, (batch, kv_heads, group, slots), generator=gen).float()
    anchors: dict = {}

    def per_layer(key, make):
        anchors.setdefault(key, make(seed))
        return anchors[key].expand(batch, *anchors[key].shape)

    return SimpleNamespace(
        positions=positions.contiguous(),
        valid=valid.contiguous(),
        start=start,
        seen=seen,
        state={"score": score, "count": torch.randint(1, 4, (batch, kv_heads, slots)).float()},
        num_kv_heads=kv_heads,
        context_lengths=(4 * slots,) * batch,
        aligned=aligned,
        order=order_keys(positions.contiguous()),
        per_layer=per_layer,
    )


def _both(policy, view, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    compiled = policy.keep_mask(view, budget)
    with kernels.disabled():
        reference = policy.keep_mask(view, budget)
    return compiled, reference


CASES = list(
    itertools.product(
        ("mean", "random", "alternate", "ones"),
        ("bucket", "ovg", "linspace"),
        ((2, 3, 3), (1, 2, 4), (2, 1, 5)),  # (batch, KV heads, group)
        (False, True),  # aligned: one signature per slot
    )
)


@pytest.mark.parametrize(("anchor", "pick", "heads", "aligned"), CASES)
def test_compiled_selection_matches_the_op_path(anchor, pick, heads, aligned, compiled_kernel) -> None:
    batch, kv_heads, group = heads
    for seed, (slots, holes) in enumerate(((97, 0.0), (130, 0.1), (300, 0.05))):
        view = decode_layer(seed, batch, kv_heads, group, slots, holes, aligned)
        held = int(view.valid.sum(-1).min())
        for budget in (held - 1, held - 9, held // 2, held + 5):  # steady, interval surplus, half, too few
            for norm in ("raw", "lifetime"):
                spec = f"h2o+kvcrush:budget={budget},crush=0.25,anchor={anchor},pick={pick},sink=2,recent=8,norm={norm}"
                compiled, reference = _both(parse_policy(spec), view, budget)
                assert torch.equal(compiled, reference), (spec, norm, seed)


@pytest.mark.parametrize("host", ["tova", "snapkv", "streaming"])
def test_compiled_selection_other_hosts(host: str, compiled_kernel) -> None:
    """A layer-shared host (one signature row) and hosts whose scores are not accumulated attention."""
    for seed, aligned in ((0, True), (1, False)):
        view = decode_layer(seed, 2, 3, 3, 200, 0.05, aligned or host in ("tova", "streaming"))
        view.state["last"] = view.state["score"]
        budget = int(view.valid.sum(-1).min()) - 3
        policy = parse_policy(f"{host}+kvcrush:budget={budget},crush=0.3,anchor=mean")
        compiled, reference = _both(policy, view, budget)
        assert torch.equal(compiled, reference), (host, seed)


def test_compiled_selection_distinct_scores_and_threads(compiled_kernel) -> None:
    """Continuous scores (the sampled median's bracket, no ties) at decode sizes, on one and on two threads."""
    view = decode_layer(5, 30, 3, 3, 1025, 0.01, False)
    view.state["score"] = torch.rand(view.state["score"].shape, generator=torch.Generator().manual_seed(1)) ** 4
    budget = int(view.valid.sum(-1).min()) - 1
    policy = parse_policy(f"h2o+kvcrush:budget={budget},crush=0.25,anchor=mean")
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            compiled, reference = _both(policy, view, budget)
            assert torch.equal(compiled, reference), n
    finally:
        torch.set_num_threads(threads)


def test_compiled_selection_rejects_bad_input(compiled_kernel) -> None:
    op = kernels.kvcrush_reps()
    view = decode_layer(0, 1, 3, 3, 50, 0.0, False)
    scores = view.state["score"].reshape(1, 9, 50)
    args = [view.valid, view.positions, view.start, view.seen, 0, 0, view.valid.clone(), view.order]
    with pytest.raises(RuntimeError, match="signature_rows"):
        op(scores, *args, torch.empty(0, dtype=torch.bool), 2, 5, 0)
    with pytest.raises(RuntimeError, match="outside"):
        op(scores, *args[:3], 10, *args[4:], torch.empty(0, dtype=torch.bool), 3, 5, 0)
