"""crushkv vs NVIDIA kvpress at identical settings: prefill+compression time and kept-set overlap per layer/head.

Two modes, same rows:

* **one process** (``--same-process``): kvpress and crushkv installed in one environment (kvpress pins
  transformers<5.3; crushkv supports 5.2), the same model object, and the timed forwards of both libraries and of
  the uncompressed model interleaved round by round, so machine noise hits every column alike::

      /tmp/kvpress-venv/bin/pip install kvpress -e .
      /tmp/kvpress-venv/bin/python -m crushkv.bench.kvpress_compare --same-process --lengths 1k,4k --threads 2

* **two environments**: this module writes the token ids, runs ``scripts/kvpress_compare.py`` (which imports nothing
  from crushkv) under ``--python``, then runs crushkv's equivalents on the same ids::

      python -m crushkv.bench.kvpress_compare --python /tmp/kvpress-venv/bin/python --lengths 1k,4k --threads 2
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from crushkv.api import cache_kwargs, compress

SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "kvpress_compare.py"
PAIRS = {
    "snapkv": "snapkv",
    "streaming": "streaming",
    "observed": "h2o",
    "expected": "expected_attention",
    "keydiff": "keydiff",
    "lagkv": "lagkv",
}


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
    if press == "expected":  # ExpectedAttentionPress defaults: 4 sinks kept, 512 future positions, covariance, vnorm
        return f"expected_attention:budget={n},sink=4,recent=0,future=512,phase=prefill"
    if press == "keydiff":
        return f"keydiff:budget={n},sink=0,recent=0,phase=prefill"
    if press == "lagkv":  # LagKVPress defaults: 4 sinks, partitions of 128, the reference-less tail kept first
        return f"lagkv:budget={n},sink=4,recent=0,lag=128,phase=prefill"
    return f"h2o:budget={n},sink=0,recent=0,norm=lifetime,phase=prefill"  # ObservedAttentionPress


@torch.no_grad()
def crushkv_prefill(model, ids: torch.Tensor, spec: str) -> tuple[float, list[list[list[int]]]]:
    """Seconds of one compressed prefill, and kept logical positions ``[layer][kv_head][slot]``."""
    with compress(model, spec) as cache:
        start = time.perf_counter()
        model(ids, **cache_kwargs(model, cache), logits_to_keep=1)
        seconds = time.perf_counter() - start
        kept = [cache.kept_positions(i)[0].sort(-1).values.tolist() for i in cache.compressed_layers]
    return seconds, kept


def jaccard(a: list[int], b: list[int]) -> float:
    sa, sb = set(a), set(b)
    return len(sa & sb) / len(sa | sb) if sa or sb else 1.0


def make_row(
    run: dict[str, Any], ratio: float, crushkv_full: float, crushkv_s: float, kept: list[list[list[int]]]
) -> dict[str, Any]:
    """One comparison row from a kvpress run record and crushkv's measurements on the same ids."""
    scores = [
        jaccard(kept[layer][head], heads[head])
        for layer, heads in ((int(k), v) for k, v in run["kept"].items())
        for head in range(len(heads))
    ]
    return {
        "press": run["press"],
        "crushkv": crushkv_spec(run["press"], run["length"], ratio),
        "length": run["length"],
        "n_kept": n_kept(run["length"], ratio),
        "kvpress_attn": run["attn_implementation"],
        "kvpress_full_s": run["prefill_full_s"],
        "kvpress_press_s": run["prefill_press_s"],
        "crushkv_full_s": crushkv_full,
        "crushkv_s": crushkv_s,
        "time_ratio": crushkv_s / run["prefill_press_s"],
        "jaccard_mean": sum(scores) / len(scores),
        "jaccard_min": min(scores),
        "layer_heads": len(scores),
    }


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
        rows.append(make_row(run, ratio, full, seconds, kept))
    return rows


def load_kvpress_side():
    """The kvpress-side helpers (``scripts/kvpress_compare.py``), imported from the checkout."""
    spec = importlib.util.spec_from_file_location("kvpress_side", SCRIPT)
    if spec is None or spec.loader is None or not SCRIPT.exists():
        raise FileNotFoundError(f"{SCRIPT} not found: --same-process runs from a crushkv checkout")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compare_same_process(
    models: dict[str, Any], prompts: dict[int, torch.Tensor], ratio: float, repeats: int, presses: tuple[str, ...]
) -> list[dict[str, Any]]:
    """Both libraries in this process on the same model objects, timings interleaved round by round.

    ``models`` maps ``"sdpa"`` (used by crushkv and by kvpress's SDPA presses) and ``"eager"`` (kvpress's
    ObservedAttentionPress needs materialised attention weights) to loaded models with the same weights.
    Each round times: the uncompressed forward kvpress's press runs on, the kvpress press, crushkv's ``full`` and
    crushkv's policy; each column keeps its best round.
    """
    side = load_kvpress_side()
    rows = []
    for length, ids in prompts.items():
        for name in presses:
            impl = "eager" if name == "observed" else "sdpa"
            spec = crushkv_spec(name, length, ratio)
            side.prefill(models[impl], ids[:, :256])  # warm-up
            crushkv_prefill(models["sdpa"], ids[:, :256], spec)
            kv_full, kv_press, cr_full, cr = [], [], [], []
            kept_kv: dict[int, list[list[int]]] = {}
            kept_cr: list[list[list[int]]] = []
            for _ in range(repeats):
                kv_full.append(side.prefill(models[impl], ids)[0])
                press = side.make_press(name, ratio)
                side.record_kept(press, kept_kv)
                kv_press.append(side.prefill(models[impl], ids, press)[0])
                cr_full.append(crushkv_prefill(models["sdpa"], ids, "full")[0])
                seconds, kept_cr = crushkv_prefill(models["sdpa"], ids, spec)
                cr.append(seconds)
            run = {
                "press": name,
                "attn_implementation": impl,
                "length": length,
                "prefill_full_s": min(kv_full),
                "prefill_press_s": min(kv_press),
                "kept": {str(layer): heads for layer, heads in sorted(kept_kv.items())},
            }
            row = make_row(run, ratio, min(cr_full), min(cr), kept_cr)
            rows.append(row)
            print(
                f"{name:10s} L={length:5d} kvpress {row['kvpress_press_s']:.3f}s crushkv {row['crushkv_s']:.3f}s "
                f"({row['time_ratio']:.2f}x) Jaccard {row['jaccard_mean']:.3f}",
                flush=True,
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
    from crushkv.eval.results import package_versions
    from crushkv.models import load_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--python", default="/tmp/kvpress-venv/bin/python", help="interpreter of the kvpress environment")
    p.add_argument("--lengths", default="1k,4k")
    p.add_argument("--ratio", type=float, default=0.75, help="kvpress compression_ratio (0.75 keeps 25%%)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--kvpress-json", default="", help="reuse a kvpress result instead of running the script")
    p.add_argument(
        "--same-process", action="store_true", help="import kvpress here (it must be installed in this environment)"
    )
    p.add_argument("--press", action="append", choices=tuple(PAIRS), help="presses to compare (default: all)")
    p.add_argument("--out", default="results/bench/kvpress_compare.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    presses = tuple(args.press or PAIRS)
    model, tokenizer = load_model(args.model)
    lengths = parse_lengths(args.lengths)
    ids = prompt_ids(tokenizer, max(lengths))
    prompts = {n: ids[:, :n] for n in lengths}
    if args.same_process:
        import transformers

        models = {"sdpa": model}
        if "observed" in presses:
            models["eager"] = load_model(args.model, attn_implementation="eager")[0]
        rows = compare_same_process(models, prompts, args.ratio, args.repeats, presses)
        meta = {
            "mode": "same-process",
            "kvpress": package_versions(("kvpress",))["kvpress"],  # kvpress has no __version__
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "ratio": args.ratio,
            "repeats": args.repeats,
            "model": args.model,
        }
    else:
        rows, meta = _two_process(args, model, prompts, presses)
    write_report({"meta": meta, "rows": rows}, args.out)
    print(format_rows(rows))
    print(f"\nJSON: {args.out}")
    return 0


def _two_process(
    args: argparse.Namespace, model, prompts: dict[int, torch.Tensor], presses: tuple[str, ...]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows and meta of the two-environment mode: kvpress's script under ``--python``, crushkv here."""
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
        for name in presses:
            cmd += ["--press", name]
        print("running kvpress:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    kv = json.loads(kv_json.read_text())
    rows = compare([r for r in kv["runs"] if r["press"] in presses], model, prompts, args.ratio, args.repeats)
    meta = {k: kv[k] for k in ("kvpress", "transformers", "torch", "threads", "ratio")}
    meta.update(
        mode="two-process", crushkv_torch=torch.__version__, crushkv_threads=torch.get_num_threads(), model=args.model
    )
    return rows, meta


if __name__ == "__main__":
    sys.exit(main())
