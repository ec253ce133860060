"""Proof 3: invariants of every selection function, as hypothesis property tests."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crushkv.crush import pick_representatives
from crushkv.policies import parse_policy
from crushkv.selection import forced_mask
from fake_layer import FakeLayer

HOSTS = ("h2o", "tova", "knorm", "random", "streaming", "snapkv")


@st.composite
def layer_case(draw):
    batch, heads, group = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    length = draw(st.integers(12, 48))
    pad = draw(st.integers(0, length // 3))
    seed = draw(st.integers(0, 10_000))
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(batch, heads, group, length, generator=gen)
    if draw(st.booleans()):  # many ties
        scores = (scores * 3).floor()
    valid = torch.ones(batch, length, dtype=torch.bool)
    valid[0, :pad] = False
    sink, recent = draw(st.integers(0, 3)), draw(st.integers(0, 6))
    budget = draw(st.integers(sink + recent + 1, length))
    return FakeLayer(scores, valid), sink, recent, budget


def _check_common(layer: FakeLayer, keep: torch.Tensor, budget: int, sink: int, recent: int) -> None:
    b, h, length = layer.positions.shape
    assert keep.shape == (b, h, budget)
    for row in keep.reshape(-1, budget):
        assert len(set(row.tolist())) == budget, "duplicate slots"
    forced = forced_mask(layer.valid, sink, recent)
    kept = torch.zeros(b, h, length, dtype=torch.bool).scatter_(-1, keep, True)
    assert not (forced & ~kept).any(), "a sink or recent token was evicted"


@settings(max_examples=60, deadline=None)
@given(case=layer_case(), host=st.sampled_from(HOSTS))
def test_host_selection_invariants(case, host):
    layer, sink, recent, budget = case
    extra = ",window=2" if host == "snapkv" else ""
    policy = parse_policy(f"{host}:budget={budget},sink={sink},recent={recent}{extra}")
    keep = policy.select(layer, budget)
    _check_common(layer, keep, budget, sink, recent)
    if policy.shared:
        assert (keep == keep[:, :1]).all(), "a layer-shared policy kept different slots per head"


@settings(max_examples=80, deadline=None)
@given(
    case=layer_case(),
    host=st.sampled_from(HOSTS),
    anchor=st.sampled_from(["random", "mean", "alternate", "zeros", "ones"]),
    pick=st.sampled_from(["bucket", "ovg", "linspace"]),
    share=st.floats(0.0, 1.0),
)
def test_kvcrush_token_invariants(case, host, anchor, pick, share):
    layer, sink, recent, budget = case
    crush = int(share * (budget - sink - recent))
    extra = ",window=2" if host == "snapkv" else ""
    spec = (
        f"{host}+kvcrush:budget={budget},sink={sink},recent={recent}{extra},crush={crush},anchor={anchor},pick={pick}"
    )
    policy = parse_policy(spec)
    keep = policy.select(layer, budget)
    _check_common(layer, keep, budget, sink, recent)
    host_keep = policy.host.select(layer, budget - crush)
    b, h, length = layer.positions.shape
    kept = torch.zeros(b, h, length, dtype=torch.bool).scatter_(-1, keep, True)
    by_host = torch.zeros_like(kept).scatter_(-1, host_keep, True)
    assert not (by_host & ~kept).any(), "KVCrush dropped a token the host kept"
    reps = kept & ~by_host
    assert (reps.sum(-1) == crush).all()
    # representatives come only from the host's evicted set, and are real tokens whenever enough exist
    evicted = layer.valid & ~by_host & ~forced_mask(layer.valid, sink, recent)
    enough = evicted.sum(-1) >= crush
    assert not (reps & ~evicted)[enough].any()


@settings(max_examples=60, deadline=None)
@given(
    case=layer_case(), block=st.integers(1, 4), share=st.floats(0.0, 1.0), anchor=st.sampled_from(["mean", "random"])
)
def test_kvcrush_block_invariants(case, block, share, anchor):
    layer, sink, recent, budget = case
    crush = int(share * (budget - sink - recent))
    spec = f"h2o+kvcrush:budget={budget},sink={sink},recent={recent},crush={crush},granularity=block,block={block}"
    spec += f",anchor={anchor}"
    policy = parse_policy(spec)
    keep = policy.select(layer, budget)
    _check_common(layer, keep, budget, sink, recent)
    assert (keep == keep[:, :1]).all(), "block granularity is layer-shared"


@settings(max_examples=100, deadline=None)
@given(
    m=st.integers(0, 40),
    extra=st.integers(0, 10),
    k=st.integers(0, 20),
    rule=st.sampled_from(["bucket", "ovg", "linspace"]),
    seed=st.integers(0, 999),
)
def test_representatives_come_from_candidates(m, extra, k, rule, seed):
    gen = torch.Generator().manual_seed(seed)
    n = m + extra
    if n == 0 or k > n:
        return
    distance = torch.randint(0, 5, (1, n), generator=gen)
    perm = torch.randperm(n, generator=gen)
    candidates = torch.zeros(1, n, dtype=torch.bool)
    candidates[0, perm[:m]] = True
    reps = pick_representatives(distance, candidates, k, rule, fillers=~candidates)[0]
    assert len(set(reps.tolist())) == k
    taken = candidates[0, reps]
    assert int(taken.sum()) == min(k, m), "candidates must be used before fillers"
    if rule == "bucket" and 0 < k <= m:
        # one pick per equal-size bucket of the distance-sorted candidates
        order = candidates[0].nonzero().squeeze(1)
        order = order[torch.sort(distance[0, order], stable=True).indices]
        ranks = sorted(int((order == r).nonzero()) for r in reps)
        for i, rank in enumerate(ranks):
            assert i * m // k <= rank < (i + 1) * m // k + (1 if (i + 1) * m % k else 0)


@settings(max_examples=100, deadline=None)
@given(length=st.integers(2, 40), seed=st.integers(0, 999), ties=st.booleans())
def test_drop_one_fast_path_matches_the_sort(length, seed, ties):
    from crushkv.selection import topk_slots

    prio = torch.rand(2, 3, length, generator=torch.Generator().manual_seed(seed))
    if ties:
        prio = (prio * 2).floor()
    order = torch.sort(prio, dim=-1, descending=True, stable=True).indices[..., : length - 1].sort(-1).values
    assert torch.equal(topk_slots(prio, length - 1), order)


def _stable_topk_reference(prio: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(prio, dim=-1, descending=True, stable=True).indices[..., :k].sort(-1).values


@settings(max_examples=150, deadline=None)
@given(
    length=st.integers(1, 60),
    k=st.integers(0, 60),
    seed=st.integers(0, 999),
    ties=st.booleans(),
    infs=st.booleans(),
)
def test_selection_top_k_matches_the_stable_sort(length, k, seed, ties, infs):
    from crushkv.selection import mask_to_indices, top_mask, topk_slots

    k = min(k, length)
    gen = torch.Generator().manual_seed(seed)
    prio = torch.rand(2, 3, length, generator=gen)
    if ties:
        prio = (prio * 3).floor()
    if infs:  # forced slots (+inf) and padding (-inf), as ``priority`` produces them
        special = torch.randint(0, 4, prio.shape, generator=gen)
        prio = prio.masked_fill(special == 0, float("inf")).masked_fill(special == 1, float("-inf"))
    expected = _stable_topk_reference(prio, k)
    assert torch.equal(topk_slots(prio, k), expected)
    mask = top_mask(prio, k)
    assert torch.equal(mask.sum(-1), torch.full(prio.shape[:-1], k))
    assert torch.equal(mask_to_indices(mask, k), expected)
    # the sync-free forms other devices use (CPU takes data-dependent fast paths) give the same answers
    from crushkv.selection import _resolve_ties, _scatter_indices

    if 0 < k < length:
        kth = torch.kthvalue(prio, length - k + 1, dim=-1, keepdim=True).values
        assert torch.equal(_resolve_ties(prio, kth, k), mask)
    assert torch.equal(_scatter_indices(mask, k), expected)


@settings(max_examples=100, deadline=None)
@given(length=st.integers(2, 50), seed=st.integers(0, 999), ties=st.booleans(), pad=st.integers(0, 5))
def test_indicators_match_the_rank_definition(length, seed, ties, pad):
    from crushkv.crush import indicators

    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(2, 4, length, generator=gen)
    if ties:
        scores = (scores * 2).floor()
    region = torch.ones(2, 4, length, dtype=torch.bool)
    region[..., : min(pad, length)] = False
    if pad % 2:  # rows with different region sizes take the sort path, the others the selection path
        region[0, :, -1] = False
    prio = torch.where(region, scores, torch.full_like(scores, float("-inf")))
    order = torch.sort(prio, dim=-1, descending=True, stable=True).indices
    expected = torch.zeros_like(region)
    for b in range(2):
        for h in range(4):
            half = int(region[b, h].sum()) // 2
            expected[b, h, order[b, h, :half]] = True
    assert torch.equal(indicators(scores, region), expected & region)


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(2, 40),
    k=st.integers(1, 20),
    rule=st.sampled_from(["bucket", "ovg", "linspace"]),
    seed=st.integers(0, 999),
    steady=st.booleans(),
)
def test_representative_mask_matches_the_picks(n, k, rule, seed, steady):
    from crushkv.crush import representative_mask

    gen = torch.Generator().manual_seed(seed)
    m = min(k + 1, n) if steady else int(torch.randint(0, n + 1, (1,), generator=gen))
    k = min(k, n)
    distance = torch.randint(0, 4, (2, n), generator=gen)
    candidates = torch.zeros(2, n, dtype=torch.bool)
    for row in range(2):
        candidates[row, torch.randperm(n, generator=gen)[:m]] = True
    picks = pick_representatives(distance, candidates, k, rule, fillers=~candidates)
    expected = torch.zeros_like(candidates).scatter_(-1, picks, True)
    assert torch.equal(representative_mask(distance, candidates, k, rule, fillers=~candidates), expected)


def _reference_picks(distance: list[int], candidates: list[bool], fillers: list[bool], k: int, rule: str) -> list[int]:
    """Plain-Python definition: candidates in (distance, slot) order, one per bucket by ``rule``, then fillers."""
    order = sorted((d, slot) for slot, (d, c) in enumerate(zip(distance, candidates)) if c)
    m, take = len(order), min(len(order), k)
    if rule == "bucket":
        ranks = [i * m // take for i in range(take)]
    elif rule == "ovg":
        ranks = [i * (m // take) for i in range(take)]
    else:
        ranks = [i * (m - 1) // (take - 1) if take > 1 else 0 for i in range(take)]
    spare = [slot for slot, (c, f) in enumerate(zip(candidates, fillers)) if f and not c]
    return [order[r][1] for r in ranks] + spare[: k - take]


@settings(max_examples=150, deadline=None)
@given(
    rows=st.integers(1, 4),
    n=st.integers(1, 30),
    k=st.integers(0, 12),
    rule=st.sampled_from(["bucket", "ovg", "linspace"]),
    same_count=st.booleans(),
    seed=st.integers(0, 999),
)
def test_representatives_match_the_plain_definition(rows, n, k, rule, same_count, seed):
    """Rows with equal candidate counts take the shared-rank path, unequal ones the per-row path: both match."""
    gen = torch.Generator().manual_seed(seed)
    k = min(k, n)
    distance = torch.randint(0, 4, (rows, n), generator=gen)
    candidates = torch.zeros(rows, n, dtype=torch.bool)
    fixed = int(torch.randint(0, n + 1, (1,), generator=gen))
    for row in range(rows):
        m = fixed if same_count else int(torch.randint(0, n + 1, (1,), generator=gen))
        candidates[row, torch.randperm(n, generator=gen)[:m]] = True
    fillers = ~candidates
    import crushkv.crush as crush

    limit = crush.PRESENCE_TABLE_ELEMENTS
    try:
        for crush.PRESENCE_TABLE_ELEMENTS in (limit, 0):  # presence table (CPU default), then the sort (other devices)
            picks = pick_representatives(distance, candidates, k, rule, fillers=fillers)
            for row in range(rows):
                reference = _reference_picks(
                    distance[row].tolist(), candidates[row].tolist(), fillers[row].tolist(), k, rule
                )
                assert picks[row].tolist() == reference
    finally:
        crush.PRESENCE_TABLE_ELEMENTS = limit
