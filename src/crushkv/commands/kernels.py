"""``crushkv kernels``: build (if needed) and report the optional compiled CPU kernels."""

from __future__ import annotations

import argparse

from crushkv import kernels


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("kernels", help="build and show the compiled CPU kernels (exact H2O prompt pass)")
    p.add_argument("--check", action="store_true", help="exit 1 when the kernel is not in use")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    mode = kernels.mode()  # a bad CRUSHKV_KERNELS value is a ValueError: one line, exit 2 (crushkv.cli)
    print(f"mode: {mode} (CRUSHKV_KERNELS=auto|off|require)")
    print(f"compiler: {kernels.compiler() or 'none found'}")
    print(f"kernels: {kernels.describe()}")
    return 1 if args.check and kernels.load().op is None else 0
