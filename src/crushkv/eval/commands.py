"""`crushkv eval`, `crushkv sweep` and `crushkv report` sub-commands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from crushkv.eval.common import COMPRESSION_MODES, QUERY_AWARE

TASKS = ("gsm8k", "niah", "ruler", "ppl")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.replace(" ", "").split(",") if x)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.replace(" ", "").split(",") if x)


def _words(text: str) -> tuple[str, ...]:
    return tuple(x for x in text.replace(" ", "").split(",") if x)


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="catalog name (smollm2-135m, qwen2.5-coder-0.5b, ...) or path/hub id")
    p.add_argument("--task", action="append", choices=TASKS, help="task (repeatable)")
    p.add_argument("--policy", action="append", default=None, help="policy spec (repeatable); default: full")
    p.add_argument(
        "--compression",
        action="append",
        choices=COMPRESSION_MODES,
        help="question-agnostic: compress the context before the question is seen; query-aware: question included "
        f"in the compressed prompt (repeatable; default {QUERY_AWARE}). ppl is always 'streaming'.",
    )
    p.add_argument("--limit", type=int, default=None, help="first N examples of each task")
    p.add_argument("--out", type=Path, default=Path("results"), help="output directory (default: results)")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (default float32)")
    p.add_argument("--attn", default="sdpa", help="attention implementation (default sdpa)")
    p.add_argument("--seed", type=int, default=1234, help="seed for needles, shots and samples (default 1234)")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="examples per left-padded generate call (query-aware generation tasks; default 1)",
    )
    p.add_argument("--chat", action="store_true", help="use the tokenizer's chat template (instruct models)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="override the task's generation length")
    p.add_argument("--overwrite", action="store_true", help="discard existing results of the same runs")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = p.add_argument_group("task options")
    g.add_argument("--num-fewshot", type=int, default=5, help="gsm8k shots (default 5)")
    g.add_argument("--lengths", type=_ints, default=None, help="niah/ruler prompt lengths in tokens, e.g. 1024,2048")
    g.add_argument("--depths", type=_floats, default=None, help="niah depths in %% (default 0,25,50,75,100)")
    g.add_argument("--ruler-tasks", type=_words, default=None, help="ruler sub-tasks, e.g. niah_single,vt,cwe")
    g.add_argument("--samples", type=int, default=5, help="ruler samples per sub-task and length (default 5)")
    g.add_argument("--ppl-length", type=int, default=1024, help="ppl tokens per document (default 1024)")
    g.add_argument("--ppl-docs", type=int, default=2, help="ppl documents (default 2)")
    g.add_argument("--ppl-chunk", type=int, default=1, help="ppl tokens per forward; 1 = exact streaming (default)")
    g.add_argument("--ppl-prefill", type=int, default=0, help="ppl tokens fed in one first forward (default 0)")


def add_parser(subparsers: Any) -> None:
    """Register `eval`, `sweep` and `report`."""
    p = subparsers.add_parser("eval", help="evaluate policies on gsm8k / niah / ruler / ppl")
    _add_run_args(p)
    p.set_defaults(func=cmd_eval)

    p = subparsers.add_parser("sweep", help="evaluate methods x budgets x tasks")
    _add_run_args(p)
    p.add_argument(
        "--method", action="append", default=[], help='method spec without budget, e.g. h2o, "h2o+kvcrush:crush=0.75"'
    )
    p.add_argument("--budget", action="append", default=[], help="budget (tokens, or a ratio like 0.25); repeatable")
    p.add_argument("--no-full", action="store_true", help="do not add the full-cache baseline")
    p.set_defaults(func=cmd_sweep)

    p = subparsers.add_parser("report", help="Markdown tables and plots from a results directory")
    p.add_argument("results_dir", type=Path)
    p.add_argument("--out", type=Path, default=None, help="Markdown file (default RESULTS_DIR/report.md)")
    p.set_defaults(func=cmd_report)


def expand_sweep(methods: list[str], budgets: list[str]) -> list[str]:
    """Policy specs for every method x budget (``full`` takes no budget)."""
    specs: list[str] = []
    for method in methods:
        head, _, rest = method.strip().partition(":")
        if head.strip() == "full" or not budgets or "budget=" in rest:
            specs.append(method.strip())
            continue
        for budget in budgets:
            specs.append(f"{head}:{rest.rstrip(',')},budget={budget}" if rest.strip() else f"{head}:budget={budget}")
    return list(dict.fromkeys(specs))


def build_tasks(args: argparse.Namespace) -> list[Any]:
    """Task objects from the command-line options."""
    from crushkv.eval import gsm8k, niah, ppl, ruler

    tasks = []
    for name in dict.fromkeys(args.task or ["niah"]):
        mnt = {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else {}
        if name == "gsm8k":
            tasks.append(gsm8k.GSM8KTask(num_fewshot=args.num_fewshot, chat=args.chat, seed=args.seed, **mnt))
        elif name == "niah":
            tasks.append(
                niah.NIAHTask(
                    lengths=args.lengths or niah.DEFAULT_LENGTHS,
                    depths=args.depths or niah.DEFAULT_DEPTHS,
                    seed=args.seed,
                    chat=args.chat,
                    **mnt,
                )
            )
        elif name == "ruler":
            tasks.append(
                ruler.RulerTask(
                    subtasks=args.ruler_tasks or ruler.SUBTASKS,
                    samples=args.samples,
                    lengths=args.lengths or ruler.DEFAULT_LENGTHS,
                    seed=args.seed,
                    chat=args.chat,
                )
            )
        elif name == "ppl":
            tasks.append(
                ppl.PPLTask(length=args.ppl_length, docs=args.ppl_docs, chunk=args.ppl_chunk, prefill=args.ppl_prefill)
            )
    return tasks


def run_specs(args: argparse.Namespace, specs: list[str], load: Any = None) -> int:
    """Load the model once and run every task x policy x mode; prints one line per run."""
    import torch

    from crushkv.eval.runner import ConfigMismatch, RunOptions, modes_for, resolve_policy, run_task

    try:
        for spec in specs:  # fail fast on a bad spec, before loading the model
            resolve_policy(spec)
        tasks = build_tasks(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if load is None:
        from crushkv.models import load_model as load
    model, tokenizer = load(args.model, dtype=args.dtype, attn_implementation=args.attn)
    opts = RunOptions(
        model=args.model,
        out_dir=args.out,
        dtype=args.dtype,
        attn_implementation=args.attn,
        seed=args.seed,
        limit=args.limit,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    modes = list(dict.fromkeys(args.compression or [QUERY_AWARE]))
    try:
        for task in tasks:
            for spec in specs:
                for mode in modes_for(task, modes):
                    summary = run_task(model, tokenizer, task, spec, mode, opts)
                    metrics = ", ".join(f"{k}={v:.4g}" for k, v in summary["metrics"].items())
                    print(f"{task.name:6s} {mode:18s} {spec}: n={summary['n']} {metrics}", flush=True)
    except ConfigMismatch as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished examples are saved; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    return run_specs(args, list(dict.fromkeys(args.policy or ["full"])))


def cmd_sweep(args: argparse.Namespace) -> int:
    if not args.method and not args.policy:
        print("error: give at least one --method (or --policy)", file=sys.stderr)
        return 2
    specs = ([] if args.no_full else ["full"]) + expand_sweep(args.method, args.budget) + list(args.policy or [])
    return run_specs(args, list(dict.fromkeys(specs)))


def cmd_report(args: argparse.Namespace) -> int:
    from crushkv.eval.report import write_report

    if not args.results_dir.is_dir():
        print(f"error: {args.results_dir} is not a directory", file=sys.stderr)
        return 2
    path = write_report(args.results_dir, args.out)
    print(path)
    return 0
