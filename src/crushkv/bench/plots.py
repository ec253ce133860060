"""Log-log plot of each cost against the context length, one line per policy, exponents in the legend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

DPI = 150  # PNGs stay readable when a README or a report scales them down

PANELS = (
    ("prefill_s", "prefill / TTFT (s)"),
    ("decode_s_per_token", "decode (s / token)"),
    ("e2e_s", "end-to-end (s)"),
    ("scoring_overhead_s", "scoring overhead (s)"),
    ("selection_s", "selection: top-k + KVCrush + gather (s)"),
    ("kv_nbytes", "KV cache held (bytes)"),
)


def _value(cell: dict[str, Any], key: str) -> float:
    if key == "selection_s":
        return cell["host_select_s"] + cell["kvcrush_s"] + cell["gather_s"]
    return float(cell[key])


def plot_growth(report: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """Write a small PNG (matplotlib Agg); zero costs are left out of the log axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from crushkv.bench.fit import fit_exponent

    cells = report["cells"]
    policies = list(dict.fromkeys(c["policy"] for c in cells))
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
    for ax, (key, label) in zip(axes.flat, PANELS, strict=True):
        for i, policy in enumerate(policies):
            rows = [c for c in cells if c["policy"] == policy]
            xs = [c["length"] for c in rows if _value(c, key) > 0]
            ys = [_value(c, key) for c in rows if _value(c, key) > 0]
            if not xs:
                continue
            k = fit_exponent(xs, ys)["exponent"]
            ax.plot(xs, ys, marker="o", color=f"C{i}", label=f"{short_name(policy)} (k={k:.2f})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("context tokens", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8, framealpha=0.85)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


#: storage settings printed only away from their defaults (two runs that differ only in the store stay apart)
STORAGE_DEFAULTS = {"store": "dense", "quant": "none", "tier": "drop", "reps": "full"}


def short_name(spec: str, keys: tuple[str, ...] = ("budget", "phase", "interval", *STORAGE_DEFAULTS)) -> str:
    """``snapkv+kvcrush:budget=0.25,...`` -> ``snapkv+kvcrush b=0.25 decode`` (host and the chosen settings).

    ``budget`` prints as ``b=``, ``phase`` bare, ``interval`` only when > 1 (``every N``, or ``interval=auto``),
    storage keys only away from their defaults, other keys as ``k=v``.
    """
    head, _, tail = spec.partition(":")
    fields = dict(part.split("=", 1) for part in tail.split(",") if "=" in part)
    if "budget" not in fields:
        return head
    words = [head]
    for key in keys:
        value = fields.get(key)
        if value is None or (key == "interval" and value == "1") or STORAGE_DEFAULTS.get(key) == value:
            continue
        every = "interval=auto" if value == "auto" else f"every {value}"
        words.append({"budget": f"b={value}", "phase": value, "interval": every}.get(key, f"{key}={value}"))
    return " ".join(words)
