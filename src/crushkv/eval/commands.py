"""`crushkv eval`, `crushkv sweep` and `crushkv report` sub-commands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from crushkv.commands.argtypes import (
    DTYPE_HELP,
    at_least,
    dtype_name,
    non_negative_int,
    percents,
    positive_int,
    token_counts,
    words,
)
from crushkv.errors import UsageError
from crushkv.eval.common import COMPRESSION_MODES, QUERY_AWARE

TASKS = ("gsm8k", "niah", "ruler", "ruler-lite", "ppl")


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
    p.add_argument("--limit", type=positive_int, default=None, help="first N examples of each task")
    p.add_argument("--out", type=Path, default=Path("results"), help="output directory (default: results)")
    p.add_argument("--dtype", type=dtype_name, default="float32", help=f"{DTYPE_HELP} (default float32)")
    p.add_argument("--attn", default="sdpa", help="attention implementation (default sdpa)")
    p.add_argument("--seed", type=int, default=1234, help="seed for needles, shots and samples (default 1234)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads")
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=1,
        help="examples per left-padded generate call (query-aware generation tasks; default 1)",
    )
    p.add_argument("--chat", action="store_true", help="use the tokenizer's chat template (instruct models)")
    p.add_argument("--max-new-tokens", type=positive_int, default=None, help="override the task's generation length")
    p.add_argument("--overwrite", action="store_true", help="discard existing results of the same runs")
    p.add_argument(
        "--no-shared-prefill",
        action="store_true",
        help="run each policy's context forward separately (question-agnostic runs of several policies otherwise "
        "share one forward per example; the results are the same)",
    )
    p.add_argument(
        "--decode-batch",
        type=positive_int,
        default=1,
        help="with a shared context forward, decode up to N policies' caches together as one batch (each row's "
        "attention and eviction stay its own cache's; the matmuls round as batched ones do; default 1)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = p.add_argument_group("task options")
    g.add_argument("--num-fewshot", type=non_negative_int, default=5, help="gsm8k shots (default 5)")
    g.add_argument(
        "--lengths", type=token_counts, default=None, help="niah/ruler lengths in tokens, e.g. 1024,4k (ruler: 4k)"
    )
    g.add_argument("--depths", type=percents, default=None, help="niah depths in %%, 0-100 (default 0,25,50,75,100)")
    g.add_argument(
        "--ruler-tasks",
        type=words,
        default=None,
        help="ruler tasks (default all 13), e.g. niah_single_1,vt,qa_1; ruler-lite: niah_single,vt,...",
    )
    g.add_argument(
        "--samples", type=positive_int, default=None, help="samples per ruler task and length (ruler 20, ruler-lite 5)"
    )
    g.add_argument("--ppl-length", type=at_least(2), default=1024, help="ppl tokens per document (default 1024)")
    g.add_argument("--ppl-docs", type=positive_int, default=2, help="ppl documents (default 2)")
    g.add_argument(
        "--ppl-chunk", type=positive_int, default=1, help="ppl tokens per forward; 1 = exact streaming (default)"
    )
    g.add_argument(
        "--ppl-prefill", type=non_negative_int, default=0, help="ppl tokens fed in one first forward (default 0)"
    )


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
    from crushkv.eval import gsm8k, niah, ppl, ruler, ruler_lite

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
        elif name in ("ruler", "ruler-lite"):
            module = ruler if name == "ruler" else ruler_lite
            tasks.append(
                module.RulerTask(
                    subtasks=args.ruler_tasks or (ruler.TASKS if name == "ruler" else ruler_lite.SUBTASKS),
                    samples=args.samples or (20 if name == "ruler" else 5),
                    lengths=args.lengths or module.DEFAULT_LENGTHS,
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
    """Check everything cheap first (specs, task options, data packages), then load the model once and run every
    task x policy x mode; prints one line per run. An output directory this command created is removed again when
    it fails before writing a result."""
    import torch

    from crushkv.data import ensure_data
    from crushkv.eval.runner import RunOptions, can_share, modes_for, resolve_policy, run_shared, run_task
    from crushkv.models import check_context, check_reference
    from crushkv.paths import cleaned_up_on_failure

    for spec in specs:  # fail fast on a bad spec, before loading the model
        resolve_policy(spec)
    tasks = build_tasks(args)
    check_reference(args.model)
    ensure_data([name for task in tasks for name in task.required_data()], auto_install=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    if load is None:
        from crushkv.models import load_model

        def load(name: str, **kw: Any) -> Any:
            return load_model(name, auto_pull=True, **kw)

    model, tokenizer = load(args.model, dtype=args.dtype, attn_implementation=args.attn)
    for task in tasks:  # a prompt past the model's positions would run, slowly, into garbage
        if task.max_positions() is not None:
            check_context(model, task.max_positions(), f"task {task.name} (longest prompt + answer)")
    opts = RunOptions(
        model=args.model,
        out_dir=args.out,
        dtype=args.dtype,
        attn_implementation=args.attn,
        seed=args.seed,
        limit=args.limit,
        batch_size=args.batch_size,
        decode_batch=args.decode_batch,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    modes = list(dict.fromkeys(args.compression or [QUERY_AWARE]))
    try:
        with cleaned_up_on_failure(args.out):
            for task in tasks:
                for mode in modes_for(task, modes):
                    if not args.no_shared_prefill and can_share(task, mode, len(specs), args.batch_size):
                        summaries, cost = run_shared(model, tokenizer, task, specs, mode, opts)
                        for spec, summary in zip(specs, summaries):
                            _print_run(task, mode, spec, summary)
                        if cost["forks"]:
                            print(
                                f"{task.name:6s} {mode:18s} shared context forwards: {cost['forwards']} for "
                                f"{cost['forks']} policy-examples ({cost['prefill_s']:.1f} s)",
                                flush=True,
                            )
                    else:
                        for spec in specs:
                            _print_run(task, mode, spec, run_task(model, tokenizer, task, spec, mode, opts))
    except KeyboardInterrupt:
        print("\ninterrupted: finished examples are saved; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


def _print_run(task: Any, mode: str, spec: str, summary: dict[str, Any]) -> None:
    metrics = ", ".join(f"{k}={v:.4g}" for k, v in summary["metrics"].items())
    print(f"{task.name:6s} {mode:18s} {spec}: n={summary['n']} {metrics}", flush=True)


def cmd_eval(args: argparse.Namespace) -> int:
    return run_specs(args, list(dict.fromkeys(args.policy or ["full"])))


def cmd_sweep(args: argparse.Namespace) -> int:
    if not args.method and not args.policy:
        raise UsageError("give at least one --method (or --policy)")
    specs = ([] if args.no_full else ["full"]) + expand_sweep(args.method, args.budget) + list(args.policy or [])
    return run_specs(args, list(dict.fromkeys(specs)))


def cmd_report(args: argparse.Namespace) -> int:
    from crushkv.eval import results
    from crushkv.eval.report import write_report

    if not args.results_dir.is_dir():
        raise UsageError(f"{args.results_dir} is not a directory")
    if not any(results.iter_summaries(args.results_dir)):
        raise UsageError(f"no results under {args.results_dir} (no *{results.SUMMARY_SUFFIX}); run crushkv eval first")
    path = write_report(args.results_dir, args.out)
    print(path)
    return 0
