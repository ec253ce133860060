"""In-model A/B of the prompt pass: a real model's prefill, full cache vs a statistics-hungry policy (exact H2O by
default), with ``crushkv.attention_math`` as checked out and as of git revision(s), interleaved round by round.

The micro-benchmark (``microbench_prompt_stats.py``) times one layer on random tensors; this one times what
``crushkv bench`` reports as *prefill scoring*: the profiler's ``attention`` seconds of the policy's prefill minus the
full cache's, in the same round, over all layers of the model, as a share of the policy's prefill. Usage:
``python scripts/ab_prefill.py [--ops] [--against REV ...] [--model smollm2-135m] [--lengths 4k] [--rounds 5]``
(``--ops``: the current code with the compiled kernel disabled as one more variant).
"""

from __future__ import annotations

import argparse
import statistics
from contextlib import contextmanager

import torch
from revision import module_at

import crushkv.cache as attention_module  # the cache drives each pass and calls attention_math.attend
from crushkv import kernels
from crushkv.bench.commands import parse_lengths, prompt_ids
from crushkv.bench.timing import timed_generation
from crushkv.models import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--policy", default="h2o:budget=0.25,phase=prefill")
    p.add_argument("--lengths", default="4k")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--against", action="append", default=[], help="git revision of attention_math.py (repeatable)")
    p.add_argument("--ops", action="store_true", help="also the current code with the compiled kernel disabled")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    variants = {"current": attention_module.attend}
    if args.ops:
        variants["current, no kernel"] = without_kernels(attention_module.attend)
    variants.update({rev: module_at(rev, "attention_math").attend for rev in args.against})
    model, tokenizer = load_model(args.model, auto_pull=True)
    lengths = parse_lengths(args.lengths)
    ids = prompt_ids(tokenizer, max(lengths))
    print(f"{args.model}, torch {torch.__version__}, {args.threads} threads, {args.policy}, {args.rounds} rounds")
    print(
        "| length | variant | full attention s | policy attention s | extra s (median) | extra s (min–max) "
        "| % of prefill (median) |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|")
    for length in lengths:
        prompt = ids[:, :length]
        rows = {name: {"full": [], "policy": [], "extra": [], "pct": []} for name in variants}
        for attend in variants.values():  # warm-up
            with swapped(attend):
                timed_generation(model, prompt[:, :256], args.policy, 1, profile=True)
        for _ in range(args.rounds):
            for name, attend in variants.items():
                with swapped(attend):
                    full = timed_generation(model, prompt, "full", 1, profile=True)
                    run = timed_generation(model, prompt, args.policy, 1, profile=True)
                full_s, policy_s = full.prefill_sections["attention"], run.prefill_sections["attention"]
                extra = policy_s - full_s + run.prefill_sections.get("observe", 0.0)
                for key, value in zip(rows[name], (full_s, policy_s, extra, 100 * extra / run.prefill_s)):
                    rows[name][key].append(value)
        for name, r in rows.items():
            full_s, policy_s, extra, pct = (statistics.median(r[k]) for k in ("full", "policy", "extra", "pct"))
            spread = f"{min(r['extra']):+.3f} – {max(r['extra']):+.3f}"
            print(f"| {length} | {name} | {full_s:.3f} | {policy_s:.3f} | {extra:+.3f} | {spread} | {pct:.1f} |")


def without_kernels(attend):
    """``attend`` on the PyTorch-op paths only (``crushkv.kernels.disabled()``)."""

    def run(*args, **kwargs):
        with kernels.disabled():
            return attend(*args, **kwargs)

    return run


@contextmanager
def swapped(attend):
    """``crushkv.attention`` calls ``attend`` for the duration."""
    saved = attention_module.attend
    attention_module.attend = attend
    try:
        yield
    finally:
        attention_module.attend = saved


if __name__ == "__main__":
    main()
