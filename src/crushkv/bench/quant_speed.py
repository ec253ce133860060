"""Decode speed and bytes of quantized slots against the unquantized store and transformers' ``QuantizedCache``.

    python -m crushkv.bench.quant_speed --model smollm2-135m --lengths 4096 8000 --new-tokens 32 --out quant.json

Rows: ``full`` (unquantized dense store), ``full:quant=int8|int4|int2`` (KIVI), ``snapkv:budget=0.5,quant=int4``
(eviction + KIVI) and transformers' ``QuantizedCache`` (quanto backend, 4 bits, the same group and residual; needs
``pip install -e ".[quanto]"``, else the row says why it is missing). Every row decodes greedily from the same
random prompt (batch 1, seeded), timed as ``crushkv.bench.timing`` does: prefill = one forward over the prompt,
decode = the following steps together.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from crushkv.api import cache_kwargs
from crushkv.bench.timing import timed_generation

SPECS = ("full", "full:quant=int8", "full:quant=int4", "full:quant=int2", "snapkv:budget=0.5,quant=int4")


def _tensor_nbytes(t) -> int:
    """Bytes of a tensor, or of the inner tensors of a tensor subclass (quanto's packed ``QTensor``)."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_nbytes(getattr(t, name)) for name in names)
    return t.untyped_storage().nbytes() if isinstance(t, torch.Tensor) and t.numel() else 0


def _quantized_cache_nbytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        for name in ("_quantized_keys", "_quantized_values", "keys", "values"):
            value = getattr(layer, name, None)
            total += 0 if value is None else _tensor_nbytes(value)
    return total


@torch.no_grad()
def time_quantized_cache(model, ids: torch.Tensor, new_tokens: int, group: int, residual: int) -> dict[str, object]:
    """Greedy decoding with transformers' ``QuantizedCache`` (quanto, 4 bits), timed like ``timed_generation``."""
    from transformers import QuantizedCache

    try:
        cache = QuantizedCache("quanto", model.config, nbits=4, q_group_size=group, residual_length=residual)
    except ImportError as err:
        return {"policy": "transformers QuantizedCache(quanto, int4)", "missing": str(err).splitlines()[0]}
    cached = cache_kwargs(model, cache)
    start = time.perf_counter()
    out = model(ids, **cached, logits_to_keep=1)
    token = out.logits[:, -1:].argmax(-1)
    prefill = time.perf_counter() - start
    generated, decode = [int(token)], 0.0
    for _ in range(new_tokens - 1):
        start = time.perf_counter()
        out = model(token, **cached)
        token = out.logits[:, -1:].argmax(-1)
        generated.append(int(token))
        decode += time.perf_counter() - start
    return {
        "policy": f"transformers QuantizedCache(quanto, int4, q_group_size={group}, residual_length={residual})",
        "prefill_s": prefill,
        "decode_tokens_per_s": (new_tokens - 1) / decode if decode > 0 else float("nan"),
        "nbytes": _quantized_cache_nbytes(cache),
        "output_ids": generated,
    }


def run(model, lengths: list[int], new_tokens: int, group: int = 32, residual: int = 128, seed: int = 0) -> list[dict]:
    """One row per (length, spec) plus the ``QuantizedCache`` row, on the same prompt per length."""
    rows = []
    vocab = model.config.get_text_config().vocab_size
    for length in lengths:
        ids = torch.randint(1, vocab, (1, length), generator=torch.Generator().manual_seed(seed))
        base = None
        for spec in SPECS:
            full_spec = spec if "quant=" not in spec else f"{spec},group={group},residual={residual}"
            run_ = timed_generation(model, ids, full_spec, new_tokens)
            row = {
                "length": length,
                "policy": run_.policy,
                "prefill_s": run_.prefill_s,
                "decode_tokens_per_s": run_.decode_tokens_per_s,
                "nbytes": run_.nbytes,
                "full_nbytes": run_.full_nbytes,
                "output_ids": run_.output_ids,
            }
            base = base or row
            row["speed_vs_full"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
            row["prefill_vs_full"] = row["prefill_s"] / base["prefill_s"]
            rows.append(row)
        peer = {"length": length, **time_quantized_cache(model, ids, new_tokens, group, residual)}
        if "decode_tokens_per_s" in peer:
            peer["speed_vs_full"] = peer["decode_tokens_per_s"] / base["decode_tokens_per_s"]
            peer["prefill_vs_full"] = peer["prefill_s"] / base["prefill_s"]
        rows.append(peer)
    return rows


def _table(rows: list[dict]) -> str:
    lines = [f"{'len':>6} {'policy':62s} {'tok/s':>7} {'x full':>6} {'prefill s':>9} {'x full':>6} {'MB':>8}"]
    for r in rows:
        if "missing" in r:
            lines.append(f"{r['length']:>6} {r['policy']:62s} missing: {r['missing']}")
            continue
        lines.append(
            f"{r['length']:>6} {r['policy'][:62]:62s} {r['decode_tokens_per_s']:7.2f} {r['speed_vs_full']:6.2f} "
            f"{r['prefill_s']:9.2f} {r['prefill_vs_full']:6.2f} {r['nbytes'] / 2**20:8.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="catalog name, local path or hub id")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8000])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--group", type=int, default=32)
    parser.add_argument("--residual", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from crushkv.models import load_model

    model, _ = load_model(args.model, auto_pull=True)
    rows = run(model, args.lengths, args.new_tokens, args.group, args.residual)
    print(_table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
