"""``crushkv policies``: list the registered policies and their settings with defaults."""

from __future__ import annotations

import argparse
import dataclasses

from crushkv.policies import REGISTRY, KVCrush


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("policies", help="list compression policies and their spec keys")
    p.set_defaults(func=run)


def _fields(cls: type) -> str:
    parts = []
    for f in dataclasses.fields(cls):
        if f.name == "host" or not f.init:
            continue
        default = "" if f.default is dataclasses.MISSING else f.default
        parts.append(f"{f.name}={default}")
    return ", ".join(parts)


def run(args: argparse.Namespace) -> int:
    for name in sorted(REGISTRY):
        cls = REGISTRY[name]
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        print(f"{name:10s} phase={cls.default_phase:7s} {'layer-shared' if cls.shared else 'per KV head':12s} {doc}")
        if cls.compresses:
            print(f"{'':10s} keys: {_fields(cls)}")
    print(f"{'+kvcrush':10s} wraps any host above, e.g. h2o+kvcrush:budget=512,crush=384,anchor=mean")
    print(f"{'':10s} keys: {_fields(KVCrush)}")
    return 0
