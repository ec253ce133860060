"""Proof 3: invariants of every selection function, as hypothesis property tests."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crushkv.crush import pick_representatives
from crushkv.policies import REGISTRY, parse_policy
from crushkv.selection import forced_mask, top_mask
from fake_layer import FakeLayer

HOSTS = tuple(sorted(name for name, cls in REGISTRY.items() if cls.compresses))
PER_HEAD_HOSTS = tuple(name for name in HOSTS if not REGISTRY[name].shared)


def _extra(host: str) -> str:
    return {"snapkv": ",window=2", "pyramidkv": ",window=2", "lagkv": ",lag=4"}.get(host, "")


@st.composite
def layer_case(draw, permuted: bool = False):
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
    perm = None
    if permuted:
        per_head = draw(st.booleans())
        shape = (batch, heads, length) if per_head else (length,)
        perm = torch.rand(shape, generator=gen).argsort(-1)
    return (scores, valid, perm), sink, recent, budget


def _forced(layer: FakeLayer, sink: int, recent: int) -> torch.Tensor:
    return forced_mask(layer.positions, layer.valid, layer.start, layer.seen, sink, recent)


def _check_common(
    layer: FakeLayer, keep: torch.Tensor, budget: int, sink: int, recent: int, ragged: bool = False
) -> None:
    assert keep.shape == layer.valid.shape and keep.dtype == torch.bool
    assert not (keep & ~layer.valid).any(), "a free or padding slot was kept"
    want = layer.valid.sum(-1).clamp(max=budget)
    if ragged:  # heads share the row's budget (KVzip): only their sum is fixed
        assert torch.equal(keep.sum((-1, -2)), want.sum(-1)), "kept != heads x min(budget, real tokens) per row"
    else:
        assert torch.equal(keep.sum(-1), want), "kept != min(budget, real tokens) per row"
    assert not (_forced(layer, sink, recent) & ~keep).any(), "a sink or recent token was evicted"


@settings(max_examples=60, deadline=None)
@given(case=layer_case(), host=st.sampled_from(HOSTS))
def test_host_selection_invariants(case, host):
    (scores, valid, _), sink, recent, budget = case
    layer = FakeLayer(scores, valid)
    policy = parse_policy(f"{host}:budget={budget},sink={sink},recent={recent}{_extra(host)}")
    keep = policy.keep_mask(layer, budget)
    _check_common(layer, keep, budget, sink, recent, policy.ragged)
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
    (scores, valid, _), sink, recent, budget = case
    layer = FakeLayer(scores, valid)
    crush = int(share * (budget - sink - recent))
    spec = f"{host}+kvcrush:budget={budget},sink={sink},recent={recent}{_extra(host)},crush={crush},anchor={anchor}"
    policy = parse_policy(f"{spec},pick={pick}")
    keep = policy.keep_mask(layer, budget)
    _check_common(layer, keep, budget, sink, recent, policy.ragged)
    by_host = policy.host.keep_mask(layer, budget - crush)
    assert not (by_host & ~keep).any(), "KVCrush dropped a token the host kept"
    reps = keep & ~by_host
    # representatives come only from the host's evicted set (sink and recent excluded), ``crush`` of them if possible
    evicted = layer.valid & ~by_host & ~_forced(layer, sink, recent)
    assert not (reps & ~evicted).any()
    if policy.ragged:  # a head the host kept (nearly) whole passes its share to the next heads
        assert torch.equal(reps.sum((-1, -2)), evicted.sum((-1, -2)).clamp(max=crush * evicted.shape[1]))
    else:
        assert torch.equal(reps.sum(-1), evicted.sum(-1).clamp(max=crush))


@settings(max_examples=60, deadline=None)
@given(
    case=layer_case(), block=st.integers(1, 4), share=st.floats(0.0, 1.0), anchor=st.sampled_from(["mean", "random"])
)
def test_kvcrush_block_invariants(case, block, share, anchor):
    (scores, valid, _), sink, recent, budget = case
    layer = FakeLayer(scores, valid)
    crush = int(share * (budget - sink - recent))
    spec = (
        f"h2o+kvcrush:budget={budget},sink={sink},recent={recent},crush={crush},anchor={anchor},"
        f"granularity=block,block={block}"
    )
    keep = parse_policy(spec).keep_mask(layer, budget)
    _check_common(layer, keep, budget, sink, recent)
    assert (keep == keep[:, :1]).all(), "block granularity is layer-shared"


def _variants(host: str, budget: int, sink: int, recent: int) -> list[str]:
    base = f"budget={budget},sink={sink},recent={recent}{_extra(host)}"
    crush = max(0, (budget - sink - recent) // 2)
    specs = [
        f"{host}:{base}",
        f"{host}+kvcrush:{base},crush={crush},anchor=mean",
        f"{host}+kvcrush:{base},crush={crush}",
    ]
    if not REGISTRY[host].shared:
        specs += [f"{host}+adakv:{base},floor=0.3", f"{host}+adakv+kvcrush:{base},crush={crush},anchor=alternate"]
    return specs


@settings(max_examples=60, deadline=None)
@given(case=layer_case(permuted=True), host=st.sampled_from(tuple(h for h in HOSTS if h != "random")))
def test_selection_depends_on_tokens_not_on_slots(case, host):
    """The same tokens in other slots (what in-place writes and compaction produce) keep the same positions: every
    store yields the same kept sets. (``random`` draws per slot, so it is exempt.)"""
    (scores, valid, perm), sink, recent, budget = case
    if REGISTRY[host].shared and perm.dim() == 3:  # layer-shared policies keep every head in the same layout
        perm = perm[:, :1].expand_as(perm)
    ordered, shuffled = FakeLayer(scores, valid), FakeLayer(scores, valid, perm=perm)
    for spec in _variants(host, budget, sink, recent):
        policy = parse_policy(spec)
        want = ordered.kept_positions(policy.keep_mask(ordered, budget))
        assert shuffled.kept_positions(policy.keep_mask(shuffled, budget)) == want, spec


@settings(max_examples=80, deadline=None)
@given(case=layer_case(permuted=True), host=st.sampled_from(PER_HEAD_HOSTS), floor=st.floats(0.0, 1.0))
def test_adakv_budgets_are_head_wise_and_sum_to_the_layer_budget(case, host, floor):
    (scores, valid, perm), sink, recent, budget = case
    layer = FakeLayer(scores, valid, perm=perm)
    policy = parse_policy(f"{host}+adakv:budget={budget},sink={sink},recent={recent}{_extra(host)},floor={floor}")
    keep = policy.keep_mask(layer, budget)
    heads = layer.num_kv_heads
    real = layer.valid.sum(-1)  # [B, H]
    assert not (keep & ~layer.valid).any()
    assert not (_forced(layer, sink, recent) & ~keep).any(), "a sink or recent token was evicted"
    counts = keep.sum(-1)
    floor_tokens = policy.head_floor(budget)
    assert (counts >= real.clamp(max=floor_tokens)).all(), "a head got less than its floor"
    # the layer's budget is spent in full (per batch row), up to the real tokens there are
    assert torch.equal(counts.sum(-1), real.sum(-1).clamp(max=heads * budget))
    # the shared part is one top-k over all heads: no evicted token outranks a kept one beyond the floor (each
    # head's own best ``floor_tokens``; not the host's keep_mask, which a ragged host such as KVzip shares too)
    prio = policy.host.priorities(layer)
    beyond = keep & ~(top_mask(prio, floor_tokens, layer.order) & layer.valid)
    evicted = layer.valid & ~keep
    for b in range(keep.shape[0]):
        if beyond[b].any() and evicted[b].any():
            assert prio[b][evicted[b]].max() <= prio[b][beyond[b]].min()


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


def _stable_topk_reference(prio: torch.Tensor, k: int, order: torch.Tensor | None = None) -> torch.Tensor:
    """Mask of the first ``k`` of a sort by (descending priority, ascending token order)."""
    if order is None:
        order = torch.arange(prio.shape[-1]).expand_as(prio)
    by_order = order.argsort(-1)
    ranked = by_order.gather(-1, torch.sort(prio.gather(-1, by_order), dim=-1, descending=True, stable=True).indices)
    return torch.zeros_like(prio, dtype=torch.bool).scatter_(-1, ranked[..., :k], True)


@settings(max_examples=200, deadline=None)
@given(
    length=st.integers(1, 60),
    k=st.integers(0, 60),
    seed=st.integers(0, 999),
    ties=st.booleans(),
    infs=st.booleans(),
    shuffled=st.booleans(),
)
def test_selection_top_k_matches_the_stable_sort(length, k, seed, ties, infs, shuffled):
    """``top_mask`` (selection + tie resolution, drop-one fast path at k = n - 1) equals the stable sort, ties going
    to the earlier token; ``order`` keys make the answer independent of the slot layout."""
    from crushkv.selection import _resolve_ties, mask_to_indices, order_keys, top_mask

    k = min(k, length)
    gen = torch.Generator().manual_seed(seed)
    prio = torch.rand(2, 3, length, generator=gen)
    if ties:
        prio = (prio * 3).floor()
    if infs:  # forced slots (+inf) and padding (-inf), as ``priority`` produces them
        special = torch.randint(0, 4, prio.shape, generator=gen)
        prio = prio.masked_fill(special == 0, float("inf")).masked_fill(special == 1, float("-inf"))
    order = None
    if shuffled:  # slot j holds the token at position perm[j]
        order = order_keys(torch.rand(2, 3, length, generator=gen).argsort(-1))
    expected = _stable_topk_reference(prio, k, order)
    mask = top_mask(prio, k, order)
    assert torch.equal(mask, expected)
    indices = mask_to_indices(mask, k)
    assert torch.equal(torch.zeros_like(mask).scatter_(-1, indices, True), mask)
    assert (indices.diff(dim=-1) > 0).all()
    if 0 < k < length:  # the sync-free tie resolution other devices always take
        kth = torch.kthvalue(prio, length - k + 1, dim=-1, keepdim=True).values
        assert torch.equal(_resolve_ties(prio, kth, k, order), expected)


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
    # the same tokens in shuffled slots get the same bits
    perm = torch.rand(2, 4, length, generator=gen).argsort(-1)
    from crushkv.selection import order_keys

    shuffled = indicators(scores.gather(-1, perm), region.gather(-1, perm), order_keys(perm))
    assert torch.equal(shuffled, (expected & region).gather(-1, perm))


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


@settings(max_examples=150, deadline=None)
@given(
    m=st.lists(st.integers(0, 12), min_size=1, max_size=5),
    k=st.integers(0, 8),
)
def test_ragged_quota_keeps_the_rows_total(m, k):
    from crushkv.crush import ragged_quota

    counts = torch.tensor([m])
    quota = ragged_quota(counts, k)
    assert (quota >= 0).all() and (quota <= counts).all(), "a head was given more picks than its candidates"
    assert int(quota.sum()) == min(len(m) * k, sum(m))
    assert (quota >= counts.clamp(max=k)).all(), "a head lost picks it could take"


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(2, 30),
    heads=st.integers(1, 4),
    k=st.integers(0, 10),
    rule=st.sampled_from(["bucket", "ovg", "linspace"]),
    seed=st.integers(0, 999),
)
def test_representative_mask_with_counts_per_row_matches_the_reference(n, heads, k, rule, seed):
    from crushkv.crush import ragged_quota, representative_mask

    gen = torch.Generator().manual_seed(seed)
    distance = torch.randint(0, 4, (1, heads, n), generator=gen)
    candidates = torch.rand(1, heads, n, generator=gen) < torch.rand(1, heads, 1, generator=gen)
    quota = ragged_quota(candidates.sum(-1), k)
    mask = representative_mask(distance, candidates, quota, rule)
    for h in range(heads):
        want = _reference_picks(distance[0, h].tolist(), candidates[0, h].tolist(), [False] * n, int(quota[0, h]), rule)
        assert sorted(mask[0, h].nonzero().flatten().tolist()) == sorted(want)
