"""Errors a user can fix: bad input or a missing piece of the environment.

The command line (``crushkv.cli.main``) prints any of them as one line, ``error: <message>``, and exits 2; the
message itself says what to do. Library callers catch them like the built-in types they also derive from.
"""

from __future__ import annotations


class CrushkvError(Exception):
    """Base class: the message is complete and meant for the user (no traceback needed)."""


class UsageError(CrushkvError, ValueError):
    """A bad argument value: an option, a model reference, a dtype, an empty prompt."""
