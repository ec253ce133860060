"""Attention over a compressed layer, with the statistics policies need, without an ``L x L`` matrix.

The output comes from PyTorch SDPA whenever no full-row statistics are needed; otherwise (H2O-style column sums
over every query) the output and the statistics come from one chunked pass, ``rows x L`` probabilities at a time.
GQA is handled by grouping query heads under their KV head (no ``repeat_kv`` copies).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from crushkv import kernels
from crushkv.stats import ALL_ROWS, TAIL_ROWS, Stats, StatsRequest
from crushkv.stores.base import Pages, QuantSlots

#: probabilities materialised per chunk of the generic pass (elements); 2M floats = 8 MB, cache-friendly
CHUNK_ELEMENTS = 1 << 21
#: probabilities per row block of the sampled (``stride > 1``) prompt statistics pass
STATS_BLOCK_ELEMENTS = 1 << 21
#: probabilities per (KV head, row block) of the exact prompt pass: 2 MB in fp32, cache-resident on a CPU core
HEAD_BLOCK_ELEMENTS = 1 << 19


@dataclass
class Visibility:
    """Which slots this pass's queries see: a slot is visible when it holds a real token that is not in the future
    (and, for a sliding-window layer, not out of the window); a query always sees itself.

    ``positions``/``valid``: ``[B, H or 1, n]`` (one row per batch element while every head holds the same slots).
    ``plain``: no mask is needed, a causal prompt without padding or one new token that sees every slot.
    """

    positions: torch.Tensor
    valid: torch.Tensor
    query_positions: torch.Tensor
    window: int | None = None
    plain: bool = False
    prompt: bool = False

    def rows(self, i0: int, i1: int) -> torch.Tensor:
        """``[B, H or 1, i1 - i0, n]`` boolean mask of query rows ``i0 .. i1 - 1``."""
        slot = self.positions[:, :, None, :]
        query = self.query_positions[i0:i1][None, None, :, None]
        if i1 - i0 == 1 and i1 == len(self.query_positions) and self.window is None:
            return self.valid[:, :, None, :] | (slot == query)  # the newest token: nothing stored is in its future
        seen = self.valid[:, :, None, :] & (slot <= query)
        if self.window is not None:
            seen &= slot > query - self.window
        return seen | (slot == query)


def _probabilities(query: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor, scaling: float) -> torch.Tensor:
    """Softmax probabilities ``[B, Hk, G, r, L]`` (fp32) for query rows ``[B, Hk, G, r, d]``."""
    b, hk, g, r, d = query.shape
    logits = torch.matmul(query.reshape(b, hk, g * r, d), keys.transpose(-1, -2)).view(b, hk, g, r, -1).float()
    logits = logits * scaling
    logits = logits.masked_fill(~visible[:, :, None], float("-inf"))
    return torch.softmax(logits, dim=-1)


class _Accumulator:
    """Sums attention probabilities of valid query rows into ``Stats``."""

    def __init__(self, shape: tuple[int, int, int, int], device: torch.device, count: bool) -> None:
        self.colsum = torch.zeros(shape, dtype=torch.float32, device=device)
        self.count = torch.zeros(shape[0], shape[1], shape[3], dtype=torch.float32, device=device) if count else None

    def add(self, probs: torch.Tensor, visible: torch.Tensor, row_valid: torch.Tensor) -> None:
        weight = row_valid[:, None, None, :, None].to(probs.dtype)
        self.colsum += (probs * weight).sum(-2)
        if self.count is not None:
            self.count += (visible & row_valid[:, None, :, None]).sum(-2).float()


#: how ``attend`` computes a pass's output (what a shared prompt forward must agree on, ``crushkv.fork``)
EXACT, CHUNKED, FLASH = "exact", "chunked", "flash"


def output_path(request: StatsRequest | None, plain: bool, q: int, length: int) -> str:
    """Which computation gives ``attend``'s output for this pass: ``exact`` (the exact prompt pass, column sums over
    every row of a plain causal prompt), ``chunked`` (full-row statistics otherwise, or any statistic of a single new
    token) or ``flash`` (SDPA; also the sampled prompt pass, whose fused output is SDPA's bit for bit). Passes with
    the same path produce the same output from the same inputs, whatever else their requests ask."""
    request = request or StatsRequest()
    causal = plain and q > 1
    if request.rows == ALL_ROWS and causal and q == length:
        return EXACT if request.stride == 1 else FLASH
    if request.rows == ALL_ROWS or (q == 1 and not request.empty):
        return CHUNKED
    return FLASH


def attend(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    visibility: Visibility,
    row_valid: torch.Tensor,
    scaling: float,
    request: StatsRequest | None,
) -> tuple[torch.Tensor, Stats]:
    """Attention output ``[B, q, Hq, d]`` and the requested statistics.

    ``row_valid``: ``[B, q]`` False for padding queries, which contribute no statistics. Paths (``output_path``):
    every row's column sums over a plain causal prompt: one exact (or row-sampled) blocked pass; every row's column
    sums otherwise, or any statistic of a single new token: the chunked pass; else SDPA for the output and the
    requested tail rows recomputed.
    """
    b, hq, q, d = query.shape
    hk, length = keys.shape[1], keys.shape[2]
    g = hq // hk
    grouped = query.view(b, hk, g, q, d)
    request = request or StatsRequest()
    visible, rows_of = _row_masks(visibility, q)
    path = output_path(request, visibility.plain, q, length)

    if path == EXACT:
        return _exact_prompt_pass(grouped, keys, values, scaling, request)
    if request.rows == ALL_ROWS and path == FLASH:
        return _sampled_prompt_pass(grouped, keys, values, scaling, request.stride, request)
    if path == CHUNKED:
        stats = Stats()
        acc = _Accumulator((b, hk, g, length), query.device, count=request.count)
        out = torch.empty(b, hk, g, q, values.shape[-1], dtype=query.dtype, device=query.device)
        step = max(1, CHUNK_ELEMENTS // max(1, b * hq * length))
        for i0 in range(0, q, step):
            i1 = min(q, i0 + step)
            vis = rows_of(i0, i1).expand(b, hk, -1, -1)
            probs = _probabilities(grouped[:, :, :, i0:i1], keys, vis, scaling)
            out[:, :, :, i0:i1] = _weighted_values(probs, values)
            acc.add(probs, vis, row_valid[:, i0:i1])
            if request.last and i1 == q:
                stats.last = probs[:, :, :, -1]
        stats.colsum, stats.count = acc.colsum, acc.count
        return out.view(b, hq, q, -1).transpose(1, 2), stats

    out = _sdpa(query, keys, values, visible, visibility.plain and q > 1, scaling, b, hk, g, q, length)
    return out, _tail_stats(grouped, keys, rows_of, row_valid, scaling, request)


def attend_stats(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    visibility: Visibility,
    row_valid: torch.Tensor,
    scaling: float,
    request: StatsRequest | None,
) -> Stats:
    """The statistics ``attend`` returns for a ``flash``-path pass, without its output (a shared prompt forward
    computes the output once and each policy's statistics here)."""
    b, hq, q, d = query.shape
    hk, length = keys.shape[1], keys.shape[2]
    if output_path(request, visibility.plain, q, length) != FLASH:
        raise ValueError("attend_stats covers passes whose output is SDPA's (output_path 'flash')")
    request = request or StatsRequest()
    grouped = query.view(b, hk, hq // hk, q, d)
    if request.rows == ALL_ROWS:  # the sampled prompt pass: its statistics need the fused kernel's row sums
        return _sampled_prompt_pass(grouped, keys, values, scaling, request.stride, request)[1]
    _, rows_of = _row_masks(visibility, q)
    return _tail_stats(grouped, keys, rows_of, row_valid, scaling, request)


def _row_masks(visibility: Visibility, q: int):
    """The pass's whole mask (``None`` when plain: SDPA's causal flag covers it) and a function giving the mask of
    query rows ``i0 .. i1 - 1`` (sliced from the whole one when it exists, built per block otherwise)."""
    visible = None if visibility.plain else visibility.rows(0, q)
    rows_of = visibility.rows if visible is None else (lambda i0, i1: visible[:, :, i0:i1])
    return visible, rows_of


def _tail_stats(grouped, keys, rows_of, row_valid, scaling: float, request: StatsRequest) -> Stats:
    """Column sums over the last ``request.rows`` query rows and/or the last row's probabilities."""
    b, hk, g, q, _ = grouped.shape
    length = keys.shape[2]
    stats = Stats()
    if request.rows is not None or request.last:
        rows = q if request.rows in (None, ALL_ROWS) else min(request.rows, q)
        i0 = q - rows if request.rows is not None else q - 1
        vis = rows_of(i0, q).expand(b, hk, -1, -1)
        probs = _probabilities(grouped[:, :, :, i0:q], keys, vis, scaling)
        if request.rows is not None:
            acc = _Accumulator((b, hk, g, length), grouped.device, count=request.count)
            acc.add(probs, vis, row_valid[:, i0:q])
            stats.colsum, stats.count = acc.colsum, acc.count
        if request.last:
            stats.last = probs[:, :, :, -1]
    return stats


def paged_attend(
    query: torch.Tensor,
    pages: Pages | QuantSlots,
    n: int,
    visibility: Visibility,
    row_valid: torch.Tensor,
    scaling: float,
    request: StatsRequest | None,
) -> tuple[torch.Tensor, Stats] | None:
    """Decode attention read in place by a compiled kernel: page by page through a store's block table
    (``KVStore.page_view``; a dense store is one page per row), or from a quantized store's packed codes: one fused
    pass, no gather of a paged store's pages and no dequantized copy of a quantized layer. The same statistics as
    ``attend``; ``None`` where the kernel does not apply (no kernel, not CPU fp32, autograd): then the caller reads
    ``KVStore.dense`` instead."""
    quantized = isinstance(pages, QuantSlots)
    op = kernels.quant_attend() if quantized else kernels.paged_attend()
    tracked = torch.is_grad_enabled() and query.requires_grad
    held = pages.fp_keys if quantized else pages.keys
    if op is None or tracked or query.device.type != "cpu" or not query.dtype == held.dtype == torch.float32:
        return None
    b, hq, q, d = query.shape
    hk = pages.where.shape[1] if quantized else pages.table.shape[0] // b
    g = hq // hk
    rows = query.reshape(b, hk, g * q, d).contiguous()  # row g * q + i: query i of head g (query heads are KV-major)
    visible = visibility.rows(0, q).contiguous()
    request = request or StatsRequest()
    if quantized:
        out, probs = op(rows, *pages[:9], n, visible, scaling, pages.bits, pages.value_size, not request.empty)
    else:
        out, probs = op(rows, pages.keys, pages.values, pages.table, n, visible, scaling, not request.empty)
    out = out.view(b, hk, g, q, -1).permute(0, 3, 1, 2, 4).reshape(b, q, hq, -1)
    stats = Stats()
    if request.empty:
        return out, stats
    probs = probs.view(b, hk, g, q, n)
    if request.rows is not None:
        i0 = 0 if request.rows == ALL_ROWS else max(0, q - request.rows)
        weight = row_valid[:, None, None, i0:, None].to(probs.dtype)
        stats.colsum = (probs[:, :, :, i0:] * weight).sum(-2)
        if request.count:
            seen = visible[:, :, i0:].expand(b, hk, -1, -1) & row_valid[:, None, i0:, None]
            stats.count = seen.sum(-2).float()
    if request.last:
        stats.last = probs[:, :, :, -1]
    return out, stats


def _sampled_prompt_pass(
    grouped: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float, stride: int, request: StatsRequest
) -> tuple[torch.Tensor, Stats]:
    """Output and row-sampled statistics of a causal prompt without padding, upper triangle skipped.

    The output comes from a fused kernel where one exists (CPU flash attention also returns each row's log-sum-exp,
    so a sampled probability block is a single ``exp`` of an augmented matmul ``[q*scale, -lse] @ [k, 1]^T``), else
    from SDPA; every ``stride``-th row before the last ``TAIL_ROWS`` is scored (weighted by ``stride``), the tail
    exactly.
    """
    b, hk, g, q, d = grouped.shape
    fused = _fused_output_and_lse(grouped, keys, values, scaling)
    if fused is not None:
        out, lse = fused
        out = out.transpose(1, 2)
    else:
        flat = grouped.reshape(b, hk * g, q, d)
        out, lse = _sdpa(flat, keys, values, None, True, scaling, b, hk, g, q, q), None
    if lse is not None:  # exp(q.k*scale - lse) straight from one matmul; lse split in two parts for 16-bit dtypes
        parts = [-lse] if grouped.dtype == torch.float32 else _split_hi_lo(-lse, grouped.dtype)
        query = torch.cat([grouped * scaling, *(p[..., None].to(grouped.dtype) for p in parts)], dim=-1)
        keys_in = torch.cat([keys, keys.new_ones(b, hk, q, len(parts))], dim=-1)
    else:
        query, keys_in = grouped * scaling, keys

    colsum = torch.zeros(b, hk, g, q, dtype=torch.float32, device=grouped.device)
    tail = min(q, TAIL_ROWS)
    step = max(8, STATS_BLOCK_ELEMENTS // max(1, b * hk * g * q))
    sampled = torch.arange(q - tail - 1, -1, -stride, device=grouped.device).flip(0)
    for j0 in range(0, sampled.numel(), step):  # sampled rows, each standing for ``stride`` rows
        rows = sampled[j0 : j0 + step]
        i1 = int(rows[-1]) + 1
        future = torch.arange(i1, device=grouped.device)[None, :] > rows[:, None]
        probs = _block_probs(query[:, :, :, rows], keys_in[:, :, :i1], future, None, lse is not None)
        colsum[..., :i1] += probs.sum(-2).mul_(stride)
    stats = Stats()
    for i0 in range(q - tail, q, step):  # exact rows, only the diagonal block is masked
        i1 = min(q, i0 + step)
        future = torch.ones(i1 - i0, i1 - i0, dtype=torch.bool, device=grouped.device).triu(1)
        probs = _block_probs(query[:, :, :, i0:i1], keys_in[:, :, :i1], future, i0, lse is not None)
        colsum[..., :i1] += probs.sum(-2)
        if request.last and i1 == q:
            stats.last = probs[:, :, :, -1]
    stats.colsum = colsum
    stats.count = _prompt_counts(b, hk, q, grouped.device) if request.count else None
    return out, stats


def _prompt_counts(b: int, hk: int, q: int, device: torch.device) -> torch.Tensor:
    """Rows of a causal prompt that see each slot: ``q - i`` for slot ``i``."""
    return (q - torch.arange(q, device=device, dtype=torch.float32)).expand(b, hk, q).clone()


def _exact_prompt_pass(
    grouped: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scaling: float,
    request: StatsRequest,
) -> tuple[torch.Tensor, Stats]:
    """Exact output and column sums from the same probability blocks: per row block one ``QK^T``, a softmax, one
    ``PV`` and a column sum, so the statistics cost little more than the attention itself.

    Queries are laid out ``[B*Hk, q, G, d]``: a row block of all query heads of one KV head is one contiguous
    ``[r*G, d]`` matrix. On CPU one (batch row, KV head) runs at a time, so both products are plain matmuls with
    ``r*G`` rows that use every thread, and blocks of ~``HEAD_BLOCK_ELEMENTS`` probabilities stay in cache between
    the four steps (SmolLM2 shapes at 4k, 2 threads: +48 ms over SDPA per layer, against +95 ms batched over the KV
    heads with 4x larger blocks). Elsewhere all heads go in one batched matmul per row block. On CPU in fp32 without
    autograd the compiled ``crushkv.kernels.exact_prompt`` runs these same steps when it is available.
    """
    b, hk, g, q, d = grouped.shape
    n, dv = b * hk, values.shape[-1]
    rows_q = grouped.reshape(n, g, q, d).transpose(1, 2).contiguous()  # read only: may alias ``grouped`` (G = 1)
    # scaled keys (G x smaller than scaling the queries), compact: the compiled op and bmm out= want row-major
    flat_keys, flat_values = keys.reshape(n, q, d).contiguous() * scaling, values.reshape(n, q, -1).contiguous()
    tracked = torch.is_grad_enabled() and any(t.requires_grad for t in (grouped, keys, values))
    plain_cpu = grouped.device.type == "cpu" and grouped.dtype == values.dtype == torch.float32
    plain_cpu = plain_cpu and not tracked  # what both the compiled op and out= buffers need
    compiled = kernels.exact_prompt() if plain_cpu else None
    if compiled is not None:  # the same pass in one compiled op, blocks spread over the threads (crushkv.kernels)
        out, colsum, last = compiled(
            rows_q.view(b, hk, q, g, d),
            flat_keys.view(b, hk, q, d),
            flat_values.view(b, hk, q, dv),
            HEAD_BLOCK_ELEMENTS,
            request.last,
        )
        counts = _prompt_counts(b, hk, q, grouped.device) if request.count else None
        stats = Stats(colsum=colsum, count=counts, last=last if request.last else None)
        return out.view(b, q, hk * g, dv), stats
    out = torch.empty(b, q, hk, g, dv, dtype=grouped.dtype, device=grouped.device)
    colsum = torch.zeros(n, g, q, dtype=torch.float32, device=grouped.device)
    last = torch.empty(n, g, q, dtype=torch.float32, device=grouped.device) if request.last else None
    per_group = heads_per_matmul(grouped.device, n)
    blocks = list(_row_blocks(q, HEAD_BLOCK_ELEMENTS // g))
    diagonal = {}  # future mask of each block's diagonal square, shared by all heads
    for i0, i1 in blocks:
        if i1 - i0 not in diagonal:
            diagonal[i1 - i0] = torch.ones(i1 - i0, i1 - i0, dtype=torch.bool, device=grouped.device).triu(1)[:, None]
    # CPU fp32 without autograd: one logits buffer for all blocks, written by the product and normalised in place
    # (fresh 2 MB blocks: 24-26 % more extra time over SDPA at 4k/8k in the one-layer micro-benchmark)
    largest = min(per_group, n) * max((i1 - i0) * g * i1 for i0, i1 in blocks)
    scratch = torch.empty(largest, dtype=torch.float32, device=grouped.device) if plain_cpu else None
    for n0 in range(0, n, per_group):
        m = min(per_group, n - n0)
        heads = slice(n0, n0 + m)
        for i0, i1 in blocks:
            r = i1 - i0
            block = rows_q[heads, i0:i1].reshape(m, r * g, d)
            buffer = None if scratch is None else scratch[: m * r * g * i1].view(m, r * g, i1)
            logits = torch.bmm(block, flat_keys[heads, :i1].transpose(1, 2), out=buffer).float()
            logits.view(m, r, g, i1)[..., i0:i1].masked_fill_(diagonal[r], float("-inf"))
            if buffer is None:
                probs = torch.softmax(logits, dim=-1)
            else:
                probs = torch.ops.aten._softmax.out(logits, -1, False, out=logits)
            mixed = torch.bmm(probs.to(values.dtype), flat_values[heads, :i1])
            if m == 1:
                bi, h = divmod(n0, hk)
                out[bi, i0:i1, h] = mixed.view(r, g, dv)
            else:
                out[:, i0:i1] = mixed.view(b, hk, r, g, dv).transpose(1, 2)
            per_row = probs.view(m, r, g, i1)
            colsum[heads, :, :i1] += per_row.sum(1)
            if last is not None and i1 == q:
                last[heads] = per_row[:, -1]
    stats = Stats(
        colsum=colsum.view(b, hk, g, q),
        count=_prompt_counts(b, hk, q, grouped.device) if request.count else None,
        last=None if last is None else last.view(b, hk, g, q),
    )
    return out.view(b, q, hk * g, dv), stats


def heads_per_matmul(device: torch.device, heads: int) -> int:
    """(Batch row, KV head) pairs per matmul of the exact prompt pass: one on CPU, all of them elsewhere."""
    return 1 if device.type == "cpu" else heads


def _row_blocks(q: int, per_head_elements: int):
    """``(i0, i1)`` row blocks of a causal triangle, each with ``rows * i1 ~ per_head_elements`` (at least 8 rows):
    blocks are tall near the top of the triangle, where rows are short."""
    i0 = 0
    while i0 < q:
        rows = max(8, int((math.sqrt(i0 * i0 + 4 * per_head_elements) - i0) / 2))
        yield i0, min(q, i0 + rows)
        i0 += rows


def _split_hi_lo(x: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    """``x`` as the sum of two ``dtype`` numbers (keeps ~16 mantissa bits through a 16-bit matmul)."""
    hi = x.to(dtype).float()
    return [hi, x - hi]


def _block_probs(
    query: torch.Tensor,
    keys: torch.Tensor,
    future: torch.Tensor,
    diag_from: int | None,
    normalised: bool,
) -> torch.Tensor:
    """Probabilities ``[B, Hk, G, r, i1]`` (fp32) of a row block; ``future`` masks ``[r, i1]``, or only the diagonal
    block ``[r, r]`` starting at column ``diag_from``. ``normalised``: the logits already have the row's lse
    subtracted (augmented matmul), so ``exp`` is the probability."""
    b, hk, g, r, d = query.shape
    logits = torch.matmul(query.reshape(b, hk, g * r, d), keys.transpose(-1, -2)).view(b, hk, g, r, -1).float()
    target = logits if diag_from is None else logits[..., diag_from : diag_from + r]
    target.masked_fill_(future, float("-inf"))
    return logits.exp_() if normalised else torch.softmax(logits, dim=-1)


def _fused_output_and_lse(
    grouped: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Causal attention output ``[B, Hq, q, d]`` and per-row log-sum-exp ``[B, Hk, G, q]`` from PyTorch's fused CPU
    flash kernel, or ``None`` where it is unavailable (other devices, older torch)."""
    kernel = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if kernel is None or grouped.device.type != "cpu":
        return None
    b, hk, g, q, d = grouped.shape
    query = grouped.reshape(b, hk * g, q, d)
    if g > 1:
        keys, values = keys.repeat_interleave(g, dim=1), values.repeat_interleave(g, dim=1)
    try:
        out, lse = kernel(query, keys, values, 0.0, True, scale=scaling)
    except RuntimeError:
        return None
    return out, lse.float().view(b, hk, g, q)


def _weighted_values(probs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    b, hk, g, r, length = probs.shape
    mixed = torch.matmul(probs.to(values.dtype).reshape(b, hk, g * r, length), values)
    return mixed.view(b, hk, g, r, -1)


def _sdpa(query, keys, values, visible, causal, scaling, b, hk, g, q, length) -> torch.Tensor:
    """Output via ``scaled_dot_product_attention``; a per-KV-head mask is shared by the head's query heads."""
    mask = None
    if visible is not None:
        mask = (
            visible
            if visible.shape[1] == 1
            else visible[:, :, None].expand(b, hk, g, q, length).reshape(b, -1, q, length)
        )
    out = F.scaled_dot_product_attention(
        query,
        keys,
        values,
        attn_mask=mask,
        is_causal=causal and mask is None and q > 1,
        scale=scaling,
        enable_gqa=g > 1,
    )
    return out.transpose(1, 2)
