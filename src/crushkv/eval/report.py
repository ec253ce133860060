"""`crushkv report`: Markdown tables in the KVCrush paper layout, accuracy-vs-budget plots and NIAH heatmaps."""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from pathlib import Path
from typing import Any

from crushkv.eval import paired as stats
from crushkv.eval import results
from crushkv.policies import AdaKV, KVCrush, Wrapper, parse_policy

DISPLAY = {
    "full": "Full",
    "h2o": "H2O",
    "snapkv": "SnapKV",
    "streaming": "StreamingLLM",
    "tova": "TOVA",
    "knorm": "KNorm",
    "pyramidkv": "PyramidKV",
    "random": "Random",
    "expected_attention": "ExpectedAttention",
    "kvzip": "KVzip",
    "keydiff": "KeyDiff",
    "lagkv": "LagKV",
}
# per task: (metric key, column name, scale, decimals)
TASK_COLUMNS: dict[str, list[tuple[str, str, float, int]]] = {
    "gsm8k": [("strict", "strict", 100.0, 1), ("flexible", "flexible", 100.0, 1)],
    "niah": [("score", "acc", 100.0, 1)],
    "ppl": [("ppl", "ppl", 1.0, 2)],
}
#: per-task columns of ``ruler`` (NVIDIA's 13, in RULER's order) and ``ruler-lite`` (crushkv's 6)
TASK_ORDER = {
    "ruler": (
        "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2", "niah_multikey_3",
        "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_1", "qa_2",
    ),
    "ruler-lite": ("niah_single", "niah_multikey", "niah_multivalue", "vt", "cwe", "fwe"),
}  # fmt: skip


def _number(text: str | None) -> int | float | None:
    if text is None:
        return None
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        return None


def policy_label(spec: str) -> tuple[str, float | None, str]:
    """(family, total budget, row label) in the paper's hh-cl style, from the parsed policy (one source of truth).

    E.g. ``("KVCrush (mean)", 512.0, "KVCrush 128-384 (mean)")``; ``"H2O 512-0"``; ``"SnapKV 25%"``;
    ``"SnapKV+Ada-KV 25%"``; ``"Full"``.
    """
    try:
        policy = parse_policy(spec)
    except ValueError:  # a result file of a policy this version no longer knows: label it by its spec
        return spec, None, spec
    wrappers = []
    while isinstance(policy, Wrapper):
        wrappers.append(policy)
        policy = policy.host
    host_name = DISPLAY.get(policy.name, policy.name)
    family, budget, label = _label(policy, wrappers, host_name)
    precision = _precision(policy) + "".join(
        f" · reps={w.reps}" for w in wrappers if isinstance(w, KVCrush) and w.reps != "full"
    )
    return (family + precision, budget, label + precision) if precision else (family, budget, label)


def _precision(policy: Any) -> str:
    """`` · int4`` / `` · tier=int2``: what a quantized store or a low-precision tier adds to a label (a quantized
    run is another point than the same budget at full precision)."""
    parts = [policy.quant] if getattr(policy, "quant", "none") != "none" else []
    if getattr(policy, "tier", "drop") != "drop":
        parts.append(f"tier={policy.tier}")
    return "".join(f" · {p}" for p in parts)


def _label(policy: Any, wrappers: list[Any], host_name: str) -> tuple[str, float | None, str]:
    if not policy.compresses:
        return host_name, None, host_name
    budget = policy.budget
    ada = any(isinstance(w, AdaKV) for w in wrappers)
    base = host_name + ("+Ada-KV" if ada else "")
    crush = next((w for w in wrappers if isinstance(w, KVCrush)), None)
    if crush is None:
        if isinstance(budget, float):
            return base, budget, f"{base} {budget * 100:g}%"
        return base, budget, f"{base} {budget}-0"
    family = ("KVCrush" if policy.name == "h2o" and not ada else f"{base}+KVCrush") + f" ({crush.anchor})"
    short = family.split(" (")[0]
    if isinstance(budget, int):
        cl = crush.crush_tokens(budget)
        hh = budget if crush.additive else budget - cl
        return family, float(hh + cl), f"{short} {hh}-{cl} ({crush.anchor})"
    # ratio budgets: the crush share is part of the family (a sweep compares several shares on one host)
    family = f"{short} crush={crush.crush} ({crush.anchor})"
    return family, budget, f"{short} {budget * 100:g}% crush={crush.crush} ({crush.anchor})"


def _disambiguate(specs: list[str]) -> dict[str, str]:
    """Row label per spec; labels shared by different specs get the differing fields appended."""
    labels = {s: policy_label(s)[2] for s in specs}
    by_label: dict[str, list[str]] = defaultdict(list)
    for s, lab in labels.items():
        by_label[lab].append(s)
    for lab, group in by_label.items():
        if len(group) < 2:
            continue
        parsed = [results.parse_spec(s)[1] for s in group]
        keys = sorted({k for p in parsed for k in p if len({q.get(k) for q in parsed}) > 1})
        for s, p in zip(group, parsed):
            labels[s] = f"{lab} [{','.join(f'{k}={p.get(k)}' for k in keys)}]"
    return labels


def _sort_key(spec: str) -> tuple[int, str, float]:
    family, budget, _ = policy_label(spec)
    return (0 if family == "Full" else 1 if "KVCrush" not in family else 2, family, budget or 0.0)


def _columns(task: str, summaries: list[dict[str, Any]]) -> list[tuple[str, str, float, int]]:
    if task not in TASK_ORDER:
        return TASK_COLUMNS.get(task, [(summaries[0].get("primary_metric", "score"), "score", 1.0, 3)])
    present = {k for s in summaries for k in s.get("metrics", {})}
    subs = [t for t in TASK_ORDER[task] if t in present]
    return [(t, t, 100.0, 1) for t in subs] + [("score", "avg", 100.0, 1)]


def _fmt(value: Any, scale: float, decimals: int) -> str:
    return "–" if value is None else f"{float(value) * scale:.{decimals}f}"


def markdown_table(task: str, runs: list[dict[str, Any]]) -> str:
    """Rows: methods (hh-cl); columns: model x metric (+ mean kept tokens per model)."""
    models = sorted({r["model"] for r in runs})
    cols = _columns(task, runs)
    specs = sorted({r["policy"] for r in runs}, key=_sort_key)
    labels = _disambiguate(specs)
    cell = {(r["model"], r["policy"]): r for r in runs}
    header = ["Method"] + [f"{results.model_slug(m)} {c[1]}" for m in models for c in cols]
    header += [f"{results.model_slug(m)} kept" for m in models]
    header += [f"{results.model_slug(m)} n" for m in models]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for spec in specs:
        row = [labels[spec]]
        for m in models:
            metrics = cell.get((m, spec), {}).get("metrics", {})
            row += [_fmt(metrics.get(key), scale, dec) for key, _, scale, dec in cols]
        for m in models:
            kept = cell.get((m, spec), {}).get("means", {}).get("kept_tokens")
            row.append("–" if kept is None else f"{kept:.0f}")
        row += [str(cell.get((m, spec), {}).get("n", "–")) for m in models]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def budget_grid(task: str, runs: list[tuple[Path, dict[str, Any]]]) -> str:
    """Method x kept fraction: the primary metric of every ratio-budget run of one model on the examples all its
    runs share (so every cell is scored on the same prompts), the full cache as its own row. Empty without at least
    two ratio budgets."""
    records = {s["policy"]: results.records_for(p) for p, s in runs}
    primary = runs[0][1].get("primary_metric", "score") if runs else "score"
    cells: dict[str, dict[float, str]] = defaultdict(dict)
    labels = {spec: policy_label(spec) for spec in records}
    full = [spec for spec, lab in labels.items() if lab[0] == "Full"]
    ratio = [spec for spec, lab in labels.items() if isinstance(lab[1], float) and lab[1] <= 1]
    budgets = sorted({labels[spec][1] for spec in ratio}, reverse=True)
    if len(budgets) < 2 or task == "ppl":
        return ""
    kept = [spec for spec in full + ratio if records[spec]]
    common = set.intersection(*({r["id"] for r in records[spec] if primary in r} for spec in kept)) if kept else set()
    if not common:
        return ""

    def score(spec: str) -> str:
        mine = [float(r[primary]) for r in records[spec] if r["id"] in common]
        return f"{100 * sum(mine) / len(mine):.1f}"

    for spec in ratio:
        family, budget, _ = labels[spec]
        if records[spec]:
            cells[family][budget] = score(spec)
    head = "| Method | " + " | ".join(f"{100 * b:g} %" for b in budgets) + " |"
    lines = [head, "|---|" + "---:|" * len(budgets)]
    lines += [f"| Full | {score(full[0])} |" + " |" * (len(budgets) - 1)] if full and records[full[0]] else []
    for family in sorted(cells, key=lambda f: (("KVCrush" in f) + ("·" in f), f)):
        lines.append(f"| {family} | " + " | ".join(cells[family].get(b, "–") for b in budgets) + " |")
    return f"Score (%) by kept fraction, on the {len(common)} examples every run has:\n\n" + "\n".join(lines)


def common_table(task: str, runs: list[tuple[Path, dict[str, Any]]]) -> str:
    """The main table recomputed on the examples that every run of one model has (runs stopped at different
    ``--limit`` are otherwise not comparable). Empty when all runs cover the same examples or for metrics that are
    not per-example means (perplexity)."""
    if task == "ppl" or len(runs) < 2:
        return ""
    records = [results.records_for(path) for path, _ in runs]
    ids = [{r["id"] for r in recs} for recs in records]
    common = set.intersection(*ids)
    if not common or all(len(i) == len(common) for i in ids):
        return ""
    cols = [c for c in _columns(task, [s for _, s in runs]) if all(c[0] in r for recs in records for r in recs)]
    if not cols:
        return ""
    labels = _disambiguate([s["policy"] for _, s in runs])
    order = sorted(range(len(runs)), key=lambda i: _sort_key(runs[i][1]["policy"]))
    lines = ["| Method | " + " | ".join(c[1] for c in cols) + " | n |", "|" + "---|" * (len(cols) + 2)]
    for i in order:
        mine = [r for r in records[i] if r["id"] in common]
        vals = [_fmt(sum(float(r[key]) for r in mine) / len(mine), scale, dec) for key, _, scale, dec in cols]
        lines.append(f"| {labels[runs[i][1]['policy']]} | " + " | ".join(vals) + f" | {len(mine)} |")
    return "\n".join(lines)


def _host_family(spec: str, precision: bool = True) -> str:
    """The host under a spec's wrappers (``"SnapKV+Ada-KV · int4"``, without Ada-KV, KVCrush or, unless
    ``precision``, the storage suffix): whom a KVCrush run is compared with."""
    try:
        policy = parse_policy(spec)
    except ValueError:
        return spec
    ada = False
    while isinstance(policy, Wrapper):
        ada = ada or isinstance(policy, AdaKV)
        policy = policy.host
    name = DISPLAY.get(policy.name, policy.name) + ("+Ada-KV" if ada else "")
    return name + _precision(policy) if precision else name


def _pairs(runs: list[tuple[Path, dict[str, Any]]]) -> list[tuple[int, int]]:
    """(method, reference) indices: every compressed run vs Full; every KVCrush run vs the plain run of its own host
    with the same total budget (vs every plain host at that budget when its own did not run); every Ada-KV run
    (without KVCrush) likewise vs the hosts without Ada-KV."""
    specs = [s["policy"] for _, s in runs]
    labels = [policy_label(s) for s in specs]
    hosts, bare_hosts = [_host_family(s) for s in specs], [_host_family(s, False) for s in specs]
    full = [i for i, lab in enumerate(labels) if lab[0] == "Full"]
    pairs = [(i, j) for i, lab in enumerate(labels) if lab[0] != "Full" and lab[1] is not None for j in full]
    for i, (family, budget, _) in enumerate(labels):
        if budget is None or ("KVCrush" not in family and "Ada-KV" not in family):
            continue
        plain = "KVCrush" not in family  # an Ada-KV run: against the hosts without Ada-KV
        refs = [
            j
            for j, other in enumerate(labels)
            if other[0] != "Full"
            and "KVCrush" not in other[0]
            and other[1] == budget
            and (not plain or "Ada-KV" not in other[0])
        ]
        # its own host (same wrappers but KVCrush, same precision), else that host at another precision
        own = [j for j in refs if hosts[j] == hosts[i]]
        own = own or [j for j in refs if bare_hosts[j] == bare_hosts[i]]
        pairs += [(i, j) for j in (own or refs)]
    return pairs


def paired_table(task: str, runs: list[tuple[Path, dict[str, Any]]]) -> str:
    """Paired comparisons on the common examples of one model: scores (with 95 % Wilson intervals for 0/1 metrics),
    wins/losses (method better / reference better on an example) and the exact two-sided binomial test on them:
    McNemar's test for 0/1 metrics, the sign test for graded ones (RULER's partial matches)."""
    records = [results.records_for(path) for path, _ in runs]
    labels = _disambiguate([s["policy"] for _, s in runs])
    metrics = [(key, name) for key, name, *_ in _columns(task, [s for _, s in runs])]
    lines = []
    for i, j in _pairs(runs):
        for key, name in metrics:
            if not (any(key in r for r in records[i]) and any(key in r for r in records[j])):
                continue
            cmp = stats.paired(records[i], records[j], key)
            if cmp.n == 0:
                continue
            binary = stats.is_binary(records[i], key) and stats.is_binary(records[j], key)
            lines.append(
                f"| {labels[runs[i][1]['policy']]} | {labels[runs[j][1]['policy']]} | {name} | {cmp.n} "
                f"| {_score_cell(cmp.method, cmp.n, binary)} | {_score_cell(cmp.reference, cmp.n, binary)} "
                f"| {cmp.wins}/{cmp.losses} | {cmp.p_value:.3g} |"
            )
    if not lines:
        return ""
    head = [
        "| Method | vs | metric | n (common) | method % [95% CI] | reference % [95% CI] | wins/losses | p |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    return "\n".join(head + lines)


def _score_cell(mean: float, n: int, binary: bool) -> str:
    if not binary:
        return f"{100 * mean:.1f}"
    lo, hi = stats.wilson(mean * n, n)
    return f"{100 * mean:.1f} [{100 * lo:.0f}, {100 * hi:.0f}]"


def byte_points(runs: list[tuple[Path, dict[str, Any]]]) -> list[tuple[str, float, float, int]]:
    """``(label, KV bytes as a fraction of the 16-bit full cache, score in %, n)`` per run of one task, model and
    mode, on the examples every run (the full one included) has. Bytes are ``cache_bytes_16`` (floating-point
    storage at 16 bits, the deployment norm, whatever dtype the run computed in) over the full run's on the same
    example. Empty without a full run that recorded them."""
    labels = _disambiguate([s["policy"] for _, s in runs])
    full = [p for p, s in runs if policy_label(s["policy"])[0] == "Full"]
    if not full:
        return []
    base = {r["id"]: r["cache_bytes_16"] for r in results.records_for(full[0]) if r.get("cache_bytes_16")}
    primary = runs[0][1].get("primary_metric", "score")
    own = {p: [r for r in results.records_for(p) if "cache_bytes_16" in r and primary in r] for p, _ in runs}
    # every point on the same examples: those all runs with records have (runs stop at different --limit)
    common = set(base).intersection(*({r["id"] for r in recs} for recs in own.values() if recs))
    points = []
    for path, s in runs:
        mine = [r for r in own[path] if r["id"] in common]
        if not mine:
            continue
        share = sum(r["cache_bytes_16"] / base[r["id"]] for r in mine) / len(mine)
        score = 100 * sum(float(r[primary]) for r in mine) / len(mine)
        points.append((labels[s["policy"]], share, score, len(mine)))
    return sorted(points, key=lambda p: (p[1], -p[2]))


def pareto(points: list[tuple[str, float, float, int]]) -> set[str]:
    """Labels of the points that no other point dominates (as few or fewer bytes and as high or higher a score,
    better in one); equal points are on the front together."""
    return {
        lab
        for lab, b, sc, _ in points
        if not any(ob <= b and osc >= sc and (ob < b or osc > sc) for _, ob, osc, _ in points)
    }


def bytes_table(points: list[tuple[str, float, float, int]]) -> str:
    front = pareto(points)
    lines = ["| Method | KV bytes (% of 16-bit full) | score % | n | Pareto |", "|---|---:|---:|---:|:---:|"]
    lines += [f"| {lab} | {100 * b:.1f} | {sc:.1f} | {n} | {'✓' if lab in front else ''} |" for lab, b, sc, n in points]
    return "\n".join(lines)


def bytes_plot(title: str, points: list[tuple[str, float, float, int]], path: Path) -> Path | None:
    """Score vs KV bytes, every run a labelled point, the Pareto front as a step line."""
    if len(points) < 2:
        return None
    plt = _plt()
    front = pareto(points)
    fig, ax = plt.subplots(figsize=(7.2, 4.8), dpi=DPI)
    for label, share, score, _ in points:  # labels on the front only (the table lists every point)
        on = label in front
        marker = "s" if "·" in label else "o"  # quantized storage, a low-precision tier or representatives
        color = "tab:red" if on else "tab:blue"
        ax.scatter([100 * share], [score], s=22 if on else 12, color=color, marker=marker, zorder=3)
        if on:
            ax.annotate(label, (100 * share, score), fontsize=6, xytext=(3, -8), textcoords="offset points")
    edge = sorted((100 * b, sc) for lab, b, sc, _ in points if lab in front)
    ax.step(
        [p[0] for p in edge], [p[1] for p in edge], where="post", color="tab:red", linewidth=1, label="Pareto front"
    )
    return _finish(plt, fig, ax, "KV bytes, % of a 16-bit full cache", "score (%)", title, path)


def _finish(plt: Any, fig: Any, ax: Any, xlabel: str, ylabel: str, title: str, path: Path) -> Path:
    """Labels, grid and legend in the report's style; saves and closes the figure."""
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.set_title(title, fontsize=10)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


DPI = 150


def kept_tokens(run: dict[str, Any]) -> float | None:
    """Mean tokens a run kept per layer and head (the report's ``kept`` column); an integer budget for old runs
    that did not record it. None for a ratio budget without a record: a ratio is not a token count."""
    kept = run.get("means", {}).get("kept_tokens")
    if kept is not None:
        return float(kept)
    if isinstance(_number(results.parse_spec(run["policy"])[1].get("budget")), int):
        return float(policy_label(run["policy"])[1])  # total tokens (KVCrush: host + representatives)
    return None


def budget_points(task: str, runs: list[dict[str, Any]]) -> tuple[dict[str, list[tuple[float, float]]], float | None]:
    """Per method family, sorted ``(mean kept tokens, primary metric)`` points; and the full cache's metric."""
    primary = runs[0].get("primary_metric", "score")
    scale = 1.0 if task == "ppl" else 100.0
    lines: dict[str, list[tuple[float, float]]] = defaultdict(list)
    full = None
    for r in runs:
        value = r.get("metrics", {}).get(primary)
        if value is None:
            continue
        family, budget, _ = policy_label(r["policy"])
        if budget is None:  # the full cache (a quantized full cache is a point of the bytes plot instead)
            full = value * scale if family == "Full" else full
            continue
        kept = kept_tokens(r)
        if kept is not None:
            lines[family].append((kept, value * scale))
    return {family: sorted(pts) for family, pts in lines.items()}, full


def budget_plot(task: str, model: str, mode: str, runs: list[dict[str, Any]], path: Path) -> Path | None:
    """Primary metric vs mean kept tokens, one line per method family, full cache as a dashed line.

    The x axis is always kept tokens: token budgets (512) and ratio budgets (0.25 of a 500-token prompt) become
    comparable, and a ratio is never drawn at x = 0.25 beside token counts.
    """
    primary = runs[0].get("primary_metric", "score")
    lines, full = budget_points(task, runs)
    if not lines:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.6, 3.8), dpi=DPI)
    for family, pts in sorted(lines.items()):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=family)
    if full is not None:
        ax.axhline(full, color="black", linestyle="--", linewidth=1, label="Full")
    kept_values = [p[0] for pts in lines.values() for p in pts]
    if min(kept_values) > 1 and max(kept_values) / min(kept_values) >= 4:
        ax.set_xscale("log", base=2)
    ylabel = primary if task == "ppl" else f"{primary} (%)"
    title = f"{task} · {results.model_slug(model)} · {mode}"
    return _finish(plt, fig, ax, "kept tokens per layer and head (mean)", ylabel, title, path)


def niah_heatmap(records: list[dict[str, Any]], title: str, path: Path) -> Path | None:
    """Depth (rows) x context length (columns) retrieval accuracy."""
    cells: dict[tuple[float, int], list[float]] = defaultdict(list)
    for r in records:
        if "depth" in r and "length" in r and "score" in r:
            cells[(float(r["depth"]), int(r["length"]))].append(float(r["score"]))
    if not cells:
        return None
    depths = sorted({d for d, _ in cells})
    lengths = sorted({n for _, n in cells})
    import numpy as np

    grid = np.full((len(depths), len(lengths)), np.nan)
    for (d, n), vals in cells.items():
        grid[depths.index(d), lengths.index(n)] = sum(vals) / len(vals)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(2.4 + 0.6 * len(lengths), 1.2 + 0.3 * len(depths)), dpi=DPI)
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
    ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths], fontsize=7)
    ax.set_xlabel("context length (tokens)", fontsize=8)
    ax.set_ylabel("needle depth", fontsize=8)
    ax.set_title(title, fontsize=7)
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def write_report(results_dir: Path, out: Path | None = None) -> Path:
    """Scan ``results_dir`` for run summaries and write the Markdown report plus figures; returns its path."""
    results_dir = Path(results_dir)
    out = Path(out) if out else results_dir / "report.md"
    fig_dir = out.parent / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    found = list(results.iter_summaries(results_dir))
    runs = [s for _, s in found]
    lines = [
        "# crushkv evaluation report",
        "",
        f"Generated {dt.datetime.now().isoformat(timespec='seconds')} from `{results_dir}` ({len(runs)} runs). "
        "Rows are methods as *hh-cl* (heavy-hitter tokens - KVCrush representative tokens); accuracies in %, "
        "`kept` = mean tokens kept per layer and head at the end of generation.",
    ]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for s in runs:
        groups[(s["task"], s.get("compression", "?"))].append(s)
    for (task, mode), group in sorted(groups.items()):
        lines += ["", f"## {task} ({mode})", "", markdown_table(task, group)]
        for model in sorted({s["model"] for s in group}):
            mine = [s for s in group if s["model"] == model]
            png = budget_plot(task, model, mode, mine, fig_dir / f"{task}__{results.model_slug(model)}__{mode}.png")
            if png:
                lines += ["", f"![{task} vs budget]({png.relative_to(out.parent).as_posix()})"]
            own = [
                (p, s) for p, s in found if (s["task"], s.get("compression", "?"), s["model"]) == (task, mode, model)
            ]
            grid = budget_grid(task, own)
            if grid:
                lines += ["", grid]
            same = common_table(task, own)
            if same:
                lines += [
                    "",
                    f"Same examples for every run ({results.model_slug(model)}: the runs above stopped at different "
                    "`--limit`, so here each is scored on the examples they all have):",
                    "",
                    same,
                ]
            points = byte_points(own)
            if len(points) > 1 and any(p[1] < 0.999 or p[1] > 1.001 for p in points):
                title = f"{task} · {results.model_slug(model)} · {mode}: score per KV byte"
                png = bytes_plot(title, points, fig_dir / f"{task}__{results.model_slug(model)}__{mode}__bytes.png")
                lines += [
                    "",
                    f"Accuracy per byte ({results.model_slug(model)}; bytes of each run's cache with its "
                    "floating-point storage at 16 bits, over the full cache's on the same example):",
                    "",
                    bytes_table(points),
                ]
                if png:
                    lines += ["", f"![{task} per byte]({png.relative_to(out.parent).as_posix()})"]
            table = paired_table(task, own)
            if table:
                lines += [
                    "",
                    f"Paired comparisons ({results.model_slug(model)}, same examples; wins = method better "
                    "than the reference on an example; p: exact McNemar test for 0/1 scores, sign test otherwise):",
                    "",
                    table,
                ]
    heatmaps = []
    for path, s in found:
        if s.get("task") != "niah":
            continue
        label = _disambiguate([s["policy"]])[s["policy"]]
        title = f"{results.model_slug(s['model'])} · {label} · {s.get('compression')}"
        stem = path.name[: -len(results.SUMMARY_SUFFIX)]
        png = niah_heatmap(results.records_for(path), title, fig_dir / f"{stem}.png")
        if png:
            heatmaps.append(f"![{title}]({png.relative_to(out.parent).as_posix()})")
    if heatmaps:
        lines += ["", "## NIAH heatmaps", "", *heatmaps]
    lines += ["", "## Runs", "", "| task | model | compression | policy | n | status |", "|---|---|---|---|---|---|"]
    for s in sorted(runs, key=lambda s: (s["task"], s["model"], s["policy"])):
        lines.append(
            f"| {s['task']} | {s['model']} | {s.get('compression')} | `{s['policy']}` | {s.get('n')} | "
            f"{s.get('status')} |"
        )
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out
