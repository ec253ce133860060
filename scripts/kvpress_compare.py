"""Run NVIDIA kvpress presses on given token ids; dump prefill+compression times and kept indices per layer/head.

Runs in its own environment (kvpress pins transformers<5.3), e.g.::

    python3 -m venv /tmp/kvpress-venv
    /tmp/kvpress-venv/bin/pip install torch==2.13.0 && /tmp/kvpress-venv/bin/pip install kvpress
    /tmp/kvpress-venv/bin/python scripts/kvpress_compare.py --model ~/.cache/crushkv/models/smollm2-135m/hf \
        --ids ids.json --ratio 0.75 --out kvpress.json

It imports nothing from crushkv; ``python -m crushkv.bench.kvpress_compare`` writes ``ids.json``, calls this script
and compares the kept sets. Kept indices are taken from the press's own scores with kvpress's own ``n_kept``
(``ScorerPress.compress``: ``scores.topk(compute_n_kept(L, ratio))``).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import time
from pathlib import Path

import torch

PRESSES = ("snapkv", "streaming", "observed", "expected", "keydiff", "lagkv")


def make_press(name: str, ratio: float):
    import kvpress

    if name == "snapkv":
        return kvpress.SnapKVPress(compression_ratio=ratio, window_size=64, kernel_size=5)
    if name == "streaming":
        return kvpress.StreamingLLMPress(compression_ratio=ratio, n_sink=4)
    if name == "expected":
        return kvpress.ExpectedAttentionPress(compression_ratio=ratio)
    if name == "keydiff":
        return kvpress.KeyDiffPress(compression_ratio=ratio)
    if name == "lagkv":
        return kvpress.LagKVPress(compression_ratio=ratio)
    return kvpress.ObservedAttentionPress(compression_ratio=ratio)


def record_kept(press, store: dict[int, list[list[int]]]) -> None:
    """Wrap ``press.score`` so that each layer's kept indices (kvpress's own top-k) are recorded."""
    from kvpress.utils import compute_n_kept

    score = press.score

    def wrapped(module, hidden_states, keys, values, attentions, kwargs):
        scores = score(module, hidden_states, keys, values, attentions, kwargs)
        n_kept = compute_n_kept(keys.shape[2], press.compression_ratio)
        kept = scores.topk(n_kept, dim=-1).indices.sort(dim=-1).values  # [B, kv_heads, n_kept]
        store[module.layer_idx] = kept[0].tolist()
        return scores

    press.score = wrapped


@torch.no_grad()
def prefill(model, ids: torch.Tensor, press=None) -> tuple[float, int]:
    """Seconds for one forward over the prompt (compression included), and the cache length after it."""
    from transformers import DynamicCache

    cache = DynamicCache()
    start = time.perf_counter()
    if press is None:
        model(ids, past_key_values=cache, logits_to_keep=1)
    else:
        with press(model):
            model(ids, past_key_values=cache, logits_to_keep=1)
    return time.perf_counter() - start, cache.get_seq_length()


def main() -> None:
    import transformers
    from transformers import AutoModelForCausalLM

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="HF safetensors directory")
    parser.add_argument("--ids", required=True, help="JSON {length: [token ids]}")
    parser.add_argument("--ratio", type=float, default=0.75, help="kvpress compression_ratio (fraction removed)")
    parser.add_argument("--press", action="append", choices=PRESSES)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = {int(k): torch.tensor([v]) for k, v in json.loads(Path(args.ids).read_text()).items()}
    models = {
        impl: AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation=impl).eval()
        for impl in ("sdpa", "eager")
    }
    report = {
        "kvpress": importlib.metadata.version("kvpress"),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "ratio": args.ratio,
        "runs": [],
    }
    for length, ids in prompts.items():
        for name in args.press or PRESSES:
            impl = "eager" if name == "observed" else "sdpa"
            model = models[impl]
            prefill(model, ids[:, :256])  # warm-up
            full = min(prefill(model, ids)[0] for _ in range(args.repeats))
            kept: dict[int, list[list[int]]] = {}
            times = []
            for _ in range(args.repeats):
                press = make_press(name, args.ratio)
                record_kept(press, kept)
                seconds, cache_len = prefill(model, ids, press)
                times.append(seconds)
            report["runs"].append(
                {
                    "press": name,
                    "attn_implementation": impl,
                    "length": length,
                    "prefill_full_s": full,
                    "prefill_press_s": min(times),
                    "cache_len": cache_len,
                    "kept": {str(layer): heads for layer, heads in sorted(kept.items())},
                }
            )
            print(f"{name:10s} L={length:5d} {impl:5s} full {full:.3f}s  press {min(times):.3f}s  kept {cache_len}")
    Path(args.out).write_text(json.dumps(report))


if __name__ == "__main__":
    main()
