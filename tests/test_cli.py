"""The command line: sub-commands are wired and bad input fails before any model is loaded."""

from __future__ import annotations

import pytest

from crushkv.cli import build_parser, main


def test_every_subcommand_is_registered():
    choices = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for name in ("demo", "generate", "policies", "models", "eval", "sweep", "report", "bench"):
        assert name in choices


def test_policies_lists_every_registered_policy(capsys):
    from crushkv.policies import REGISTRY

    assert main(["policies"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in REGISTRY) and "+kvcrush" in out


def test_generate_rejects_a_bad_spec_before_loading(monkeypatch):
    import crushkv

    monkeypatch.setattr(crushkv, "load_model", lambda *a, **k: pytest.fail("model loaded before spec validation"))
    with pytest.raises(ValueError, match="valid policies"):
        main(["generate", "--policy", "h3o:budget=5", "--prompt", "hi"])
