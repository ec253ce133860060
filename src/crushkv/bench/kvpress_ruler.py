"""RULER through NVIDIA kvpress on crushkv's prompts, scored beside crushkv's own runs of the same methods.

Runs where both libraries are installed (kvpress 0.5.5 pins transformers<5.3; crushkv supports 5.2, and
``make test-min`` builds such an environment as ``.venv-min``). Every example is crushkv's ``ruler`` task (the
same generator, seed, chat template and question-agnostic split as ``crushkv sweep --task ruler``), tokenized once
with crushkv's ``encode_parts``; kvpress's own pipeline step (``KVPressTextGenerationPipeline._forward``: the press
on the context's prefill, then its greedy answer to the question) gets exactly those ids, and its answer is scored
with RULER's metric. Records are written to ``--out`` in crushkv's results format, one run per press and kept
fraction, resumable, and each press is paired with the crushkv run of the same method in ``--against`` (a crushkv
sweep's results folder) on the examples both have::

    .venv-min/bin/python -m crushkv.bench.kvpress_ruler --model qwen2.5-coder-0.5b --lengths 4096 --seed 42 \\
        --limit 13 --kept 0.25 --press snapkv --press expected --press kvzip --against docs/eval/ruler4k \\
        --out docs/eval/kvpress-ruler4k --threads 2

The presses use the settings of crushkv's defaults for the same method (SnapKV's window 32 and pool 7, four
StreamingLLM sinks, Expected Attention's defaults), so a row compares two implementations of one method.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from crushkv.eval import paired, results
from crushkv.eval.common import encode_parts
from crushkv.eval.ruler import TASKS, RulerTask, ruler_score
from crushkv.policies import parse_policy

#: press name -> (kvpress class name, its keyword arguments, the crushkv method with the same settings)
PRESSES: dict[str, tuple[str, dict[str, Any], str]] = {
    "snapkv": ("SnapKVPress", {"window_size": 32, "kernel_size": 7}, "snapkv"),
    "streaming": ("StreamingLLMPress", {"n_sink": 4}, "streaming"),
    "expected": ("ExpectedAttentionPress", {}, "expected_attention"),
    "knorm": ("KnormPress", {}, "knorm"),
    "keydiff": ("KeyDiffPress", {}, "keydiff"),
    # kvpress ranks the whole model's scores together (layerwise=False), as crushkv's scope=model does; it masks the
    # pruned entries (its attention patch) instead of removing them
    "kvzip": ("KVzipPress", {}, "kvzip"),
}


def make_press(name: str, kept: float) -> Any:
    import kvpress

    cls, kwargs, _ = PRESSES[name]
    return getattr(kvpress, cls)(compression_ratio=1.0 - kept, **kwargs)


def crushkv_spec(name: str, kept: float) -> str:
    """Canonical spec of the crushkv run that ``name`` at ``kept`` is compared with."""
    return parse_policy(f"{PRESSES[name][2]}:budget={kept}").spec


def run_name(model: str, press: str, kept: float) -> str:
    return f"ruler__{results.model_slug(model)}__kvpress-{press}_k{kept:g}__question-agnostic"


def kvpress_answer(pipe: Any, tokenizer: Any, example: Any, press: Any) -> tuple[str, int]:
    """kvpress's answer to ``example`` on crushkv's token ids (context compressed by ``press``), and the context
    length."""
    ctx, qry = encode_parts(tokenizer, example.context, example.query)
    with torch.no_grad():
        answers = pipe._forward(
            {"context_ids": ctx, "questions_ids": [qry]},
            max_new_tokens=int(example.meta["max_new_tokens"]),
            press=press,
        )
    return answers[0], int(ctx.shape[1])


def run(model: Any, tokenizer: Any, task: RulerTask, presses: list[str], kept: float, out: Path, limit: int | None,
        model_name: str, progress: bool = True) -> None:  # fmt: skip
    """kvpress's records of every press on the first ``limit`` examples (resuming what ``out`` holds)."""
    import kvpress  # noqa: F401  (importing it registers the pipeline)
    from transformers import pipeline

    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer)
    examples = task.examples(tokenizer)[:limit]
    out.mkdir(parents=True, exist_ok=True)
    for name in presses:
        path = out / f"{run_name(model_name, name, kept)}{results.RECORDS_SUFFIX}"
        done = {r["id"] for r in results.read_records(path)} if path.exists() else set()
        with path.open("a", encoding="utf-8") as fh:
            for ex in examples:
                if ex.id in done:
                    continue
                start = time.perf_counter()
                prediction, context = kvpress_answer(pipe, tokenizer, ex, make_press(name, kept))
                record = {
                    "id": ex.id,
                    "prediction": prediction,
                    "refs": ex.refs,
                    **{k: ex.meta[k] for k in ("subtask", "length", "sample")},
                    "score": ruler_score(ex.meta["metric"], prediction, ex.refs),
                    "context_tokens": context,
                    "time_s": time.perf_counter() - start,
                    "press": PRESSES[name][0],
                    "compression_ratio": 1.0 - kept,
                }
                fh.write(json.dumps(record) + "\n")
                fh.flush()
                if progress:
                    print(f"{name} {ex.id}: {record['score']:.2f} {prediction[:60]!r}", flush=True)


def compare(out: Path, against: Path, presses: list[str], kept: float, model_name: str) -> list[dict[str, Any]]:
    """Per press: kvpress's and crushkv's mean score on their common examples, wins/losses, sign-test p."""
    by_policy = {s["policy"]: path for path, s in results.iter_summaries(against) if s.get("model") == model_name}
    rows = []
    for name in presses:
        path = out / f"{run_name(model_name, name, kept)}{results.RECORDS_SUFFIX}"
        mine = results.read_records(path) if path.exists() else []
        spec = crushkv_spec(name, kept)
        theirs = results.records_for(by_policy[spec]) if spec in by_policy else []
        cmp = paired.paired(mine, theirs, "score")
        answers = {r["id"]: r["prediction"].strip() for r in theirs}
        same = sum(1 for r in mine if r["id"] in answers and r["prediction"].strip() == answers[r["id"]])
        rows.append({"press": name, "crushkv": spec, "kept": kept, "n": cmp.n, "kvpress_score": cmp.method,
                     "crushkv_score": cmp.reference, "wins": cmp.wins, "losses": cmp.losses,
                     "p": cmp.p_value, "same_answer": same})  # fmt: skip
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| press (kvpress) | crushkv method | kept | n | kvpress % | crushkv % | kvpress better/worse | sign test p "
        "| same answer text |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        head = f"| {PRESSES[r['press']][0]} | `{r['crushkv'].split(',')[0]}` | {r['kept']:.0%} | {r['n']} "
        if not r["n"]:  # no example both libraries ran
            lines.append(head + "| – | – | – | – | – |")
            continue
        lines.append(
            head + f"| {100 * r['kvpress_score']:.1f} | {100 * r['crushkv_score']:.1f} | {r['wins']}/{r['losses']} "
            f"| {r['p']:.3g} | {r['same_answer']} of {r['n']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from crushkv.models import load_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    p.add_argument("--lengths", default="4096")
    p.add_argument("--samples", type=int, default=20, help="samples per task (the sweep's --samples)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--ruler-tasks", default="", help="comma-separated RULER tasks (default all 13)")
    p.add_argument("--limit", type=int, default=None, help="first N examples (tasks interleaved, as in the sweep)")
    p.add_argument(
        "--press", action="append", choices=tuple(PRESSES), help="presses (default snapkv, streaming, expected)"
    )
    p.add_argument(
        "--kept",
        type=float,
        action="append",
        help="fraction of the context kept, repeatable (kvpress ratio = 1 - kept; default 0.25)",
    )
    p.add_argument("--against", type=Path, required=True, help="crushkv sweep results to compare with")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    presses = args.press or ["snapkv", "streaming", "expected"]
    model, tokenizer = load_model(args.model)
    task = RulerTask(
        subtasks=tuple(t for t in args.ruler_tasks.split(",") if t) or TASKS,
        lengths=tuple(int(x) for x in args.lengths.split(",")),
        samples=args.samples,
        seed=args.seed,
        chat=True,
    )
    for kept in args.kept or [0.25]:
        if not 0.0 < kept <= 1.0:
            p.error(f"--kept must be in (0, 1], got {kept}")
        run(model, tokenizer, task, presses, kept, args.out, args.limit, args.model)
        table = format_rows(compare(args.out, args.against, presses, kept, args.model))
        print(table)
        (args.out / f"compare_k{kept:g}.md").write_text(table + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
