"""The README runs as written: its Python blocks execute (on a tiny model, and on the real one when it can be
pulled), its shell commands parse, and its links into docs/ point at files and headings that exist."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

import crushkv
from conftest import ensure_smollm2
from conftest_eval import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]


def fenced_blocks(text: str, language: str) -> list[str]:
    """The contents of the ```language fenced blocks of a Markdown text, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def test_the_readme_has_a_python_quickstart():
    assert fenced_blocks(README.read_text(), "python"), "the README lost its Python quickstart"


def _run_python_blocks(capsys) -> str:
    namespace: dict = {}
    for block in fenced_blocks(README.read_text(), "python"):
        exec(compile(block, str(README), "exec"), namespace)  # one namespace: later blocks may use earlier names
    return capsys.readouterr().out


def test_python_blocks_run_as_written_on_a_tiny_model(monkeypatch, capsys):
    """``crushkv.load_model`` returns a tiny random model with a chat template; everything else runs unchanged."""
    calls = []

    def load_model(*args, **kwargs):
        calls.append((args, kwargs))
        return tiny_model(), tiny_tokenizer()

    monkeypatch.setattr(crushkv, "load_model", load_model)
    out = _run_python_blocks(capsys)
    assert calls == [(("smollm2-135m",), {"auto_pull": True})]
    match = re.search(r"kept (\d+) of (\d+) tokens per layer, (\d+)% of the uncompressed cache's bytes", out)
    assert match, out
    kept, seen, share = map(int, match.groups())
    assert kept <= 64 < seen and share < 100  # the quickstart's budget really compresses


@pytest.mark.slow
def test_python_blocks_run_as_written_on_the_real_model(monkeypatch, capsys):
    monkeypatch.delenv("CRUSHKV_CACHE", raising=False)  # share the user's conversion cache (a pull takes ~30 s)
    ensure_smollm2()
    out = _run_python_blocks(capsys)
    assert re.search(r"kept 64 of \d+ tokens per layer", out), out


def _shell_commands(text: str) -> list[str]:
    """``crushkv ...`` command lines of the bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in fenced_blocks(text, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ")[0].strip()
            if line.startswith("crushkv "):
                commands.append(line)
    return commands


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_shell_examples_parse(page):
    """Every ``crushkv`` example in a bash block is a valid command line (parsed, not run)."""
    from crushkv.cli import build_parser

    for command in _shell_commands(page.read_text()):
        build_parser().parse_args(shlex.split(command)[1:])  # raises UsageError on an unknown option or bad value


def test_readme_shows_both_commands():
    commands = [
        line.split("#")[0].strip() for block in fenced_blocks(README.read_text(), "bash") for line in block.splitlines()
    ]
    assert commands[:2] == ["make demo", "make test"]


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)  # '#' lines inside code are not headings
    return {github_anchor(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_relative_links_resolve(page):
    links = re.findall(r"\]\(([^)\s]+)\)", page.read_text())
    for link in links:
        if re.match(r"^[a-z]+://", link):
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        assert path.exists(), f"{page.name}: broken link {link}"
        if anchor and path.suffix == ".md":
            assert anchor in _anchors(path), f"{page.name}: no heading for #{anchor} in {path.name}"
