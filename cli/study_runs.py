"""Reading run directories for the studies: which runs finished, how each is labelled
(strategy, DP mode, rank setting), the epsilon it spent, and the mean-and-band plot the
study figures share (cli/study.py, cli/exit_study.py, cli/fedspine_study.py)."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path


def _runs(dirs: list[Path]) -> list[Path]:
    found = []
    for d in dirs:
        for metrics in sorted(Path(d).rglob("metrics.csv")):
            if (metrics.parent / "stamen-config.json").is_file():
                found.append(metrics.parent)
    return found


def finished_runs(dirs: list[Path]) -> list[tuple[Path, dict, list[dict]]]:
    """(run directory, its config, its metrics.csv rows) of every run under ``dirs`` that
    finished every planned round; a run still going or failed is not a result."""
    out = []
    for run in _runs(dirs):
        config = json.loads((run / "stamen-config.json").read_text())
        rows = list(csv.DictReader(open(run / "metrics.csv")))
        if len(rows) >= 2 and len(rows) - 1 >= int(config.get("strategy.num-rounds", 0)):
            out.append((run, config, rows))
    return out


def plot_band(ax, curves: list[list[float]], *, color, label: str) -> None:
    """Mean over runs per round, with the min-max band."""
    n = min(len(c) for c in curves)
    ax.plot(range(n), [statistics.mean(c[i] for c in curves) for i in range(n)], marker="o", ms=3, color=color, label=label)
    ax.fill_between(range(n), [min(c[i] for c in curves) for i in range(n)], [max(c[i] for c in curves) for i in range(n)], color=color, alpha=0.15)


def setting(config: dict) -> str:
    ranks = config.get("lora.rank-by-partition") or []
    return "heterogeneous" if len(set(ranks)) > 1 else "homogeneous"


def privacy(config: dict) -> str:
    """"" without DP; else e.g. "local DP eps 4" (the DP study: docs/privacy.md)."""
    mode = config.get("dp.mode", "off")
    if mode == "local":
        target = float(config.get("dp.epsilon", 0))
        return f"local DP eps {target:g}" if target and not float(config.get("dp.noise-multiplier", 0)) else f"local DP z {config.get('dp.noise-multiplier')}"
    if mode == "central":
        return f"central DP z {config.get('dp.noise-multiplier')}"
    return ""


def run_label(config: dict) -> str:
    """The strategy with its DP mode: "flora", "reefl, local DP eps 8"."""
    return ", ".join(x for x in (config["strategy.name"], privacy(config)) if x)


def epsilon_text(epsilon: float) -> str:
    return "-" if math.isnan(epsilon) else f"{epsilon:.3f}"


def final_epsilon(run: Path) -> float:
    """The largest epsilon any node (or the central mechanism) reported: privacy.csv."""
    path = run / "privacy.csv"
    if not path.is_file():
        return math.nan
    return max((float(r["epsilon"]) for r in csv.DictReader(open(path))), default=math.nan)


def pyplot():
    """matplotlib's pyplot on the Agg backend (files, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, target: Path, dpi: int = 120) -> Path:
    """Lay out, write and close a study figure; returns where it went."""
    fig.tight_layout()
    fig.savefig(target, dpi=dpi)
    pyplot().close(fig)
    return target
