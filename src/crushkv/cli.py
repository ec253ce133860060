"""`crushkv` command line: a thin dispatcher; each sub-command lives in its own module."""

from __future__ import annotations

import argparse
import importlib
import sys

# sub-command name -> module exposing `add_parser(subparsers)`; each parser sets `func=callable(args) -> int`
SUBCOMMANDS: dict[str, str] = {
    "demo": "crushkv.commands.demo",
    "generate": "crushkv.commands.generate",
    "policies": "crushkv.commands.policies",
    "models": "crushkv.commands.models",
    "kernels": "crushkv.commands.kernels",
    "eval": "crushkv.eval.commands",
    "sweep": "crushkv.eval.commands",
    "report": "crushkv.eval.commands",
    "bench": "crushkv.bench.commands",
}


def build_parser() -> argparse.ArgumentParser:
    description = "KV-cache compression (KVCrush + baselines) for transformers"
    parser = argparse.ArgumentParser(prog="crushkv", description=description)
    sub = parser.add_subparsers(dest="command", required=True)
    seen: set[str] = set()
    for module_name in dict.fromkeys(SUBCOMMANDS.values()):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:  # a sub-command whose module is not built yet
            if err.name and err.name.startswith("crushkv"):
                continue
            raise
        module.add_parser(sub)
        seen.add(module_name)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
