"""``crushkv generate``: generate from a prompt with a compressed cache and report what the cache holds."""

from __future__ import annotations

import argparse
import sys

import torch

from crushkv.commands.argtypes import DTYPE_HELP, DefaultsFormatter, dtype_name, positive_int
from crushkv.errors import UsageError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate text with a compressed KV cache",
        formatter_class=DefaultsFormatter,
    )
    p.add_argument("--model", default="smollm2-135m", help="catalog name, local dir, GGUF file or hub id (org/name)")
    p.add_argument("--policy", default="full", help='policy spec, e.g. "h2o+kvcrush:budget=512,crush=384"')
    p.add_argument("--prompt", help="prompt text (default: read stdin)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to generate at most")
    p.add_argument("--dtype", type=dtype_name, default="float32", help=DTYPE_HELP)
    p.add_argument("--sample", action="store_true", help="sample (temperature 0.7, top-p 0.9) instead of greedy")
    p.add_argument("--seed", type=int, default=0, help="torch seed (for --sample)")
    p.set_defaults(func=run)


def summary_line(policy_spec: str, summary: dict, compressed_layers) -> str:
    """One line: tokens seen, kept per compressed layer, bytes held vs. an uncompressed cache."""
    kept = [summary["kept_tokens"][i] for i in compressed_layers]
    return (
        f"[{policy_spec}] tokens seen {summary['seen_tokens']}, kept per layer {min(kept)}-{max(kept)}, "
        f"KV {summary['nbytes'] / 1e6:.1f} MB vs {summary['full_nbytes'] / 1e6:.1f} MB uncompressed"
    )


def run(args: argparse.Namespace) -> int:
    import crushkv
    from crushkv.models import check_reference

    policy = crushkv.parse_policy(args.policy)  # fail fast on a bad spec or model, before loading anything
    check_reference(args.model)
    text = args.prompt if args.prompt is not None else sys.stdin.read()
    if not text.strip():
        raise UsageError("empty prompt: pass --prompt TEXT or pipe text on stdin")
    model, tokenizer = crushkv.load_model(args.model, dtype=args.dtype, auto_pull=True)
    if args.chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=not args.chat)
    torch.manual_seed(args.seed)
    sampling = {"do_sample": True, "temperature": 0.7, "top_p": 0.9} if args.sample else {"do_sample": False}
    with torch.no_grad(), crushkv.compress(model, policy, tokenizer=tokenizer) as cache:
        out = model.generate(
            **inputs, **crushkv.cache_kwargs(model, cache), max_new_tokens=args.max_new_tokens, **sampling
        )
        summary = cache.summary()
    print(tokenizer.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True))
    print("\n" + summary_line(policy.spec, summary, cache.compressed_layers), file=sys.stderr)
    for note in summary.get("notes", []):  # e.g. a prefill-phase budget that does not bound the generation
        print(f"note: {note}", file=sys.stderr)
    return 0
