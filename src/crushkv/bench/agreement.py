"""Kept-set agreement and prefill cost of policies against a reference policy on the same prompt.

Shows what an approximation costs in selection quality (e.g. ``h2o`` with ``stride=4`` vs exact ``h2o``): per
length, the Jaccard overlap of the kept positions in every layer and KV head, and each prefill's extra time over
the uncompressed prefill. ::

    python -m crushkv.bench.agreement --model smollm2-135m --lengths 4k \\
        --reference "h2o:budget=0.25,phase=prefill" --policy "h2o:budget=0.25,phase=prefill,stride=4"
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import torch

from crushkv.bench.kvpress_compare import crushkv_prefill, jaccard
from crushkv.policies import parse_policy


@torch.no_grad()
def full_prefill(model, ids: torch.Tensor) -> float:
    """Seconds of one uncompressed prefill (logits of the last position only)."""
    start = time.perf_counter()
    model(ids, logits_to_keep=1)
    return time.perf_counter() - start


def agreement(
    model, prompts: dict[int, torch.Tensor], reference: str, policies: list[str], repeats: int = 1
) -> list[dict[str, Any]]:
    """One row per (length, policy): best-of-``repeats`` prefill times and Jaccard vs the reference's kept sets."""
    rows = []
    for length, ids in prompts.items():
        full_prefill(model, ids)  # warm-up
        times: dict[str, float] = {"full": min(full_prefill(model, ids) for _ in range(repeats))}
        kept: dict[str, list[list[list[int]]]] = {}
        for spec in [reference, *policies]:
            runs = [crushkv_prefill(model, ids, spec) for _ in range(repeats + 1)][1:]  # first run: warm-up
            times[spec] = min(seconds for seconds, _ in runs)
            kept[spec] = runs[0][1]
        for spec in [reference, *policies]:
            scores = [
                jaccard(a, b) for ref_layer, layer in zip(kept[reference], kept[spec]) for a, b in zip(ref_layer, layer)
            ]
            rows.append(
                {
                    "length": length,
                    "policy": spec,
                    "reference": reference,
                    "full_s": times["full"],
                    "prefill_s": times[spec],
                    "extra_pct_of_full": 100.0 * (times[spec] - times["full"]) / times["full"],
                    "jaccard_mean": statistics.fmean(scores),
                    "jaccard_min": min(scores),
                }
            )
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| ctx | policy | full prefill s | prefill s | extra vs full | Jaccard vs reference (mean) | (min) |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ref = " (reference)" if r["policy"] == r["reference"] else ""
        lines.append(
            f"| {r['length']} | `{r['policy']}`{ref} | {r['full_s']:.3f} | {r['prefill_s']:.3f} "
            f"| {r['extra_pct_of_full']:+.1f}% | {r['jaccard_mean']:.3f} | {r['jaccard_min']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from crushkv.bench.commands import DTYPES, parse_lengths, prompt_ids, write_report
    from crushkv.models import load_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--lengths", default="4k")
    p.add_argument("--reference", required=True, help="policy whose kept sets are the reference")
    p.add_argument("--policy", action="append", default=[], help="policy compared with the reference (repeatable)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="results/bench/agreement.json")
    args = p.parse_args(argv)
    for spec in [args.reference, *args.policy]:
        parse_policy(spec)  # bad specs fail before the model loads
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, dtype=DTYPES[args.dtype], auto_pull=True)
    lengths = parse_lengths(args.lengths)
    ids = prompt_ids(tokenizer, max(lengths))
    rows = agreement(model, {n: ids[:, :n] for n in lengths}, args.reference, args.policy, max(1, args.repeats))
    meta = {"model": args.model, "dtype": args.dtype, "threads": torch.get_num_threads(), "torch": torch.__version__}
    write_report({"meta": meta, "rows": rows}, args.out)
    print(format_rows(rows))
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
