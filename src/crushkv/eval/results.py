"""Result files: one JSONL of per-example records and one summary JSON per run (task x model x policy x mode).

Records are appended and flushed one by one, so an interrupted run keeps everything finished so far; a rerun skips
the ids already present. A truncated last line (killed mid-write) is dropped when the file is reopened.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

RECORDS_SUFFIX = ".jsonl"
SUMMARY_SUFFIX = ".summary.json"


def slug(text: str, max_len: int = 60) -> str:
    """File-name-safe version of ``text``."""
    out = re.sub(r"[^A-Za-z0-9.+=-]+", "_", str(text)).strip("_")
    return out[:max_len] or "x"


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"h2o+kvcrush:budget=512,crush=384"`` -> ``("h2o+kvcrush", {"budget": "512", "crush": "384"})``."""
    head, _, tail = spec.partition(":")
    fields = {}
    for item in filter(None, (p.strip() for p in tail.split(","))):
        key, _, value = item.partition("=")
        fields[key.strip()] = value.strip()
    return head.strip(), fields


def policy_slug(spec: str) -> str:
    """Short readable id of a canonical spec: name, budget, crush, anchor and a hash of the full spec."""
    name, fields = parse_spec(spec)
    bits = [name] + [f"{k[0]}{fields[k]}" for k in ("budget", "crush") if k in fields]
    if "anchor" in fields:
        bits.append(fields["anchor"])
    digest = hashlib.sha1(spec.encode()).hexdigest()[:8]
    return slug("_".join(bits)) + "_" + digest


def model_slug(name: str) -> str:
    return slug(Path(str(name).rstrip("/")).name or str(name), 40)


def run_stem(task: str, model: str, spec: str, mode: str) -> str:
    return f"{task}__{model_slug(model)}__{policy_slug(spec)}__{mode}"


def read_records(path: Path, repair: bool = False) -> list[dict[str, Any]]:
    """Records of a JSONL file; a broken trailing line is skipped (and cut from the file when ``repair``)."""
    if not path.exists():
        return []
    records: list[dict[str, Any]] = []
    good_bytes, partial = 0, False
    with path.open("rb") as fh:
        for raw in fh:
            if not raw.endswith(b"\n"):  # only the last line can be unterminated: an interrupted write
                partial = True
                break
            good_bytes += len(raw)
            if raw.strip():
                try:
                    records.append(json.loads(raw))
                except ValueError:  # a corrupt line in the middle: skip it, keep the rest
                    continue
    if partial and repair:
        with path.open("r+b") as fh:
            fh.truncate(good_bytes)
    return records


def append_record(fh: TextIO, record: dict[str, Any]) -> None:
    """Write one record and push it to disk (survives Ctrl-C and kills)."""
    fh.write(json.dumps(record, ensure_ascii=False, default=_json_default) + "\n")
    fh.flush()
    os.fsync(fh.fileno())


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomic JSON write (tmp file + rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=_json_default) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def iter_summaries(root: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """(path, summary) of every run under ``root``, sorted by path."""
    for path in sorted(Path(root).rglob("*" + SUMMARY_SUFFIX)):
        try:
            yield path, read_json(path)
        except (OSError, ValueError):
            continue


def records_for(summary_path: Path) -> list[dict[str, Any]]:
    """The per-example records next to a summary file."""
    stem = summary_path.name[: -len(SUMMARY_SUFFIX)]
    return read_records(summary_path.with_name(stem + RECORDS_SUFFIX))


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def package_versions(extra: tuple[str, ...] = ()) -> dict[str, str | None]:
    """Installed versions of crushkv's main dependencies (and of ``extra`` distributions); None when absent."""
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("crushkv", "torch", "transformers", "tokenizers", "numpy", "lm-eval", *extra):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> dict[str, Any] | None:
    """Commit and dirty flag of the source tree crushkv is imported from (None outside a git checkout)."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(dirty)}


def environment() -> dict[str, Any]:
    import torch

    return {
        "versions": package_versions(),
        "git": git_commit(),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
    }
