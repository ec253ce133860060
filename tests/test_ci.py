"""CI runs the README's first command from nothing: guard the wiring, since the run itself lives outside pytest."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _recipe(target: str) -> str:
    text = (ROOT / "Makefile").read_text()
    match = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n|[ \t]*#.*\n)+)", text, flags=re.M)
    assert match, f"no {target} target in the Makefile"
    return match.group(1)


def test_ci_runs_the_demo_from_nothing_before_the_tests():
    steps = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("make ")]
    assert steps[:2] == ["make demo-fresh", "make test"], steps


def test_demo_fresh_uses_a_new_venv_and_an_empty_cache():
    recipe = _recipe("demo-fresh")
    assert "rm -rf $(FRESH_VENV)" in recipe.splitlines()[0]  # the venv is rebuilt by the project's own Makefile
    assert "CRUSHKV_CACHE=$$cache" in recipe and "cache=$$(mktemp -d)" in recipe  # model + kernel cache start empty
    assert "$(MAKE) --no-print-directory demo VENV=$(FRESH_VENV)" in recipe  # the same target the README names


def test_the_readme_names_make_demo_and_the_makefile_runs_crushkv_demo():
    assert "$(BIN)/crushkv demo $(DEMO_ARGS)" in _recipe("demo")
