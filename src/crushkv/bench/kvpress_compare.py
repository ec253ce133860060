"""crushkv vs NVIDIA kvpress at identical settings: prefill+compression time and kept-set overlap per layer/head.

kvpress runs in its own environment (``scripts/kvpress_compare.py``); this module writes the token ids, calls it,
runs crushkv's equivalents on the same ids and compares. ::

    python -m crushkv.bench.kvpress_compare --python /tmp/kvpress-venv/bin/python --lengths 1k,4k --threads 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from crushkv.api import compress

SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "kvpress_compare.py"
PAIRS = {"snapkv": "snapkv", "streaming": "streaming", "observed": "h2o"}


def n_kept(length: int, ratio: float) -> int:
    """kvpress's ``compute_n_kept``: ``int(L * (1 - ratio))``, at least 1."""
    return max(1, int(length * (1 - ratio)))


def crushkv_spec(press: str, length: int, ratio: float) -> str:
    """The crushkv policy that reproduces a kvpress press (prefill-only compression, same budget)."""
    n = n_kept(length, ratio)
    if press == "snapkv":  # window always kept, avg pool of 5 over the window-mean (sum: same ranking), no sink
        return f"snapkv:budget={n},window=64,kernel=5,pool=avg,sink=0,phase=prefill"
    if press == "streaming":
        return f"streaming:budget={n},sink=4,phase=prefill"
    return f"h2o:budget={n},sink=0,recent=0,norm=lifetime,phase=prefill"  # ObservedAttentionPress


@torch.no_grad()
def crushkv_prefill(model, ids: torch.Tensor, spec: str) -> tuple[float, list[list[list[int]]]]:
    """Seconds of one compressed prefill, and kept logical positions ``[layer][kv_head][slot]``."""
    with compress(model, spec) as cache:
        start = time.perf_counter()
        model(ids, past_key_values=cache, logits_to_keep=1)
        seconds = time.perf_counter() - start
        kept = [cache.kept_positions(i)[0].sort(-1).values.tolist() for i in cache.compressed_layers]
    return seconds, kept


def jaccard(a: list[int], b: list[int]) -> float:
    sa, sb = set(a), set(b)
    return len(sa & sb) / len(sa | sb) if sa or sb else 1.0


def compare(
    kvpress_runs: list[dict[str, Any]], model, prompts: dict[int, torch.Tensor], ratio: float, repeats: int
) -> list[dict[str, Any]]:
    """One row per (press, length): both libraries' times and the mean/min Jaccard of the kept sets."""
    rows = []
    for run in kvpress_runs:
        ids = prompts[run["length"]]
        spec = crushkv_spec(run["press"], run["length"], ratio)
        crushkv_prefill(model, ids[:, :256], "full")  # warm-up
        full = min(crushkv_prefill(model, ids, "full")[0] for _ in range(repeats))
        timed = [crushkv_prefill(model, ids, spec) for _ in range(repeats)]
        seconds, kept = min(timed, key=lambda t: t[0])
        scores = [
            jaccard(kept[layer][head], heads[head])
            for layer, heads in ((int(k), v) for k, v in run["kept"].items())
            for head in range(len(heads))
        ]
        rows.append(
            {
                "press": run["press"],
                "crushkv": spec,
                "length": run["length"],
                "n_kept": n_kept(run["length"], ratio),
                "kvpress_attn": run["attn_implementation"],
                "kvpress_full_s": run["prefill_full_s"],
                "kvpress_press_s": run["prefill_press_s"],
                "crushkv_full_s": full,
                "crushkv_s": seconds,
                "time_ratio": seconds / run["prefill_press_s"],
                "jaccard_mean": sum(scores) / len(scores),
                "jaccard_min": min(scores),
                "layer_heads": len(scores),
            }
        )
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| kvpress press (attn) | crushkv policy | ctx | kept | kvpress full s | kvpress press s | crushkv full s "
        "| crushkv s | crushkv / kvpress | Jaccard mean | Jaccard min |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['press']} ({r['kvpress_attn']}) | `{r['crushkv'].split(',phase')[0]}` | {r['length']} "
            f"| {r['n_kept']} | {r['kvpress_full_s']:.3f} | {r['kvpress_press_s']:.3f} | {r['crushkv_full_s']:.3f} "
            f"| {r['crushkv_s']:.3f} | {r['time_ratio']:.2f}x | {r['jaccard_mean']:.3f} | {r['jaccard_min']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from crushkv.bench.commands import parse_lengths, prompt_ids, write_report
    from crushkv.models import load_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--python", default="/tmp/kvpress-venv/bin/python", help="interpreter of the kvpress environment")
    p.add_argument("--lengths", default="1k,4k")
    p.add_argument("--ratio", type=float, default=0.75, help="kvpress compression_ratio (0.75 keeps 25%%)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--kvpress-json", default="", help="reuse a kvpress result instead of running the script")
    p.add_argument("--out", default="results/bench/kvpress_compare.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    lengths = parse_lengths(args.lengths)
    ids = prompt_ids(tokenizer, max(lengths))
    prompts = {n: ids[:, :n] for n in lengths}
    kv_json = Path(args.kvpress_json) if args.kvpress_json else None
    if kv_json is None:
        tmp = Path(tempfile.mkdtemp(prefix="kvpress-"))
        (tmp / "ids.json").write_text(json.dumps({n: t[0].tolist() for n, t in prompts.items()}))
        kv_json = tmp / "kvpress.json"
        weights = Path(model.name_or_path)
        cmd = [
            args.python,
            str(SCRIPT),
            "--model",
            str(weights),
            "--ids",
            str(tmp / "ids.json"),
            "--ratio",
            str(args.ratio),
            "--repeats",
            str(args.repeats),
            "--threads",
            str(args.threads),
            "--out",
            str(kv_json),
        ]
        print("running kvpress:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    kv = json.loads(kv_json.read_text())
    rows = compare(kv["runs"], model, prompts, args.ratio, args.repeats)
    meta = {k: kv[k] for k in ("kvpress", "transformers", "torch", "threads", "ratio")}
    meta.update(crushkv_torch=torch.__version__, crushkv_threads=torch.get_num_threads(), model=args.model)
    write_report({"meta": meta, "rows": rows}, args.out)
    print(format_rows(rows))
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
