"""`crushkv` command line: a thin dispatcher; each sub-command lives in its own module.

Every sub-command shares one error path (``main``): bad input of any kind -- a bad option value, a bad policy spec,
a model that cannot be found or loaded, a missing data package -- prints one line ``error: ...`` on stderr and exits
2; Ctrl-C prints ``interrupted`` and exits 130. ``--debug`` (or ``CRUSHKV_DEBUG=1``) lets the exception through with
its traceback, for developers.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from crushkv.errors import CrushkvError, UsageError

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

# What counts as bad input: crushkv's own errors; ValueError (policy specs, the core's checks of budgets and
# arguments); OSError (paths that do not exist, transformers failing to read a model directory or hub id).
USER_ERRORS: tuple[type[BaseException], ...] = (CrushkvError, ValueError, OSError)
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a process killed by Ctrl-C
DEBUG_ENV = "CRUSHKV_DEBUG"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors go through ``main``'s one-line error path instead of usage + exit."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see: {self.prog} --help)")


def _version() -> str:
    from crushkv import __version__

    return f"crushkv {__version__}"


def build_parser() -> argparse.ArgumentParser:
    description = "KV-cache compression (KVCrush + baselines) for transformers"
    parser = Parser(prog="crushkv", description=description)
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument(
        "--debug", action="store_true", help=f"show full tracebacks instead of one-line errors (or {DEBUG_ENV}=1)"
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
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


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (multi-line messages joined with ' '; the type name when it is empty)."""
    text = " ".join(line.strip() for line in str(err).strip().splitlines() if line.strip())
    if isinstance(err, KeyError) and len(err.args) == 1:  # str(KeyError) adds quotes around the message
        text = str(err.args[0])
    return text or type(err).__name__


def _debug_env() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def main(argv: list[str] | None = None) -> int:
    debug = _debug_env()
    try:
        args = build_parser().parse_args(argv)
        debug = debug or args.debug
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except USER_ERRORS as err:
        if debug:
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
