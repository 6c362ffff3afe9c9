"""``stamen study DIR [DIR ...]``: the accuracy study's table and plot from run directories.

Groups the finished runs under DIR (every planned round in metrics.csv) by (strategy, rank setting) from each run's config.json:
"homogeneous" when every client has one rank, else "heterogeneous". For each group:
final held-out accuracy (last round of metrics.csv) as mean and sample std over the runs
(seeds), and the downlink bytes per round (round 1, and the mean of later rounds). Writes
``study.json`` and ``study.png`` (held-out accuracy per round, mean over seeds with the
min-max band, one panel per setting) into the first DIR.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path


COLORS = {"flora": "#55A868", "fedit": "#C44E52", "hetlora": "#8172B2", "flexlora": "#4C72B0"}  # one per strategy, every panel


def _runs(dirs: list[Path]) -> list[Path]:
    found = []
    for d in dirs:
        for metrics in sorted(Path(d).rglob("metrics.csv")):
            if (metrics.parent / "config.json").is_file():
                found.append(metrics.parent)
    return found


def finished_runs(dirs: list[Path]) -> list[tuple[Path, dict, list[dict]]]:
    """(run directory, its config, its metrics.csv rows) of every run under ``dirs`` that
    finished every planned round; a run still going or failed is not a result."""
    out = []
    for run in _runs(dirs):
        config = json.loads((run / "config.json").read_text())
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


def collect(finished: list[tuple[Path, dict, list[dict]]]) -> dict[tuple[str, str], list[dict]]:
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for run, config, rows in finished:
        groups[(run_label(config), setting(config))].append(
            {
                "run": str(run),
                "seed": config.get("train.seed"),
                "accuracy": [float(r["eval_accuracy"]) for r in rows],
                "downlink": [int(r["downlink_bytes"]) for r in rows[1:] if r.get("downlink_bytes")],
                "ranks": config.get("lora.rank-by-partition"),
                "epsilon": final_epsilon(run),
            }
        )
    return groups


def table(groups) -> list[dict]:
    out = []
    for (name, kind), runs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        final = [r["accuracy"][-1] for r in runs]
        later = [b for r in runs for b in r["downlink"][1:]]
        out.append(
            {
                "strategy": name,
                "setting": kind,
                "runs": len(runs),
                "seeds": sorted(r["seed"] for r in runs),
                "rounds": len(runs[0]["accuracy"]) - 1,
                "final_accuracy_mean": statistics.mean(final),
                "final_accuracy_std": statistics.stdev(final) if len(final) > 1 else math.nan,
                "downlink_round1_mb": statistics.mean(r["downlink"][0] for r in runs if r["downlink"]) / 1e6,
                "downlink_later_mb": statistics.mean(later) / 1e6 if later else math.nan,
                "epsilon_max": max((r["epsilon"] for r in runs), default=math.nan),
            }
        )
    return out


def epsilon_text(epsilon: float) -> str:
    return "-" if math.isnan(epsilon) else f"{epsilon:.3f}"


def final_epsilon(run: Path) -> float:
    """The largest epsilon any node (or the central mechanism) reported: privacy.csv."""
    path = run / "privacy.csv"
    if not path.is_file():
        return math.nan
    return max((float(r["epsilon"]) for r in csv.DictReader(open(path))), default=math.nan)


def plot(groups, target: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({k for _, k in groups})
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for (name, k), runs in sorted(groups.items()):
            if k != kind:
                continue
            plot_band(ax, [r["accuracy"] for r in runs], color=COLORS.get(name), label=f"{name} ({len(runs)} seed{'s' if len(runs) > 1 else ''})")
        ax.set_title(f"{kind} ranks")
        ax.set_xlabel("round")
        ax.set_ylabel("held-out accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(target, dpi=120)
    plt.close(fig)
    return target


def study(dirs: list[str | Path], echo=print) -> list[dict]:
    """The LoRA study's table and plot; runs of the early-exit strategies go to
    :func:`stamen.exit_study.exit_study` (their own table and plot)."""
    from stamen.config import EARLY_EXIT_STRATEGIES

    dirs = [Path(d) for d in dirs]
    finished = finished_runs(dirs)
    exit_runs = [f for f in finished if f[1].get("strategy.name") in EARLY_EXIT_STRATEGIES]
    lora_runs = [f for f in finished if f[1].get("strategy.name") not in EARLY_EXIT_STRATEGIES]
    if exit_runs:
        from stamen.exit_study import exit_study

        rows = exit_study(exit_runs, dirs[0], echo=echo)
        if not lora_runs:
            return rows
    groups = collect(lora_runs)
    if not groups:
        raise FileNotFoundError(f"no run directories (metrics.csv + config.json) under {', '.join(map(str, dirs))}")
    rows = table(groups)
    private = any(not math.isnan(r["epsilon_max"]) for r in rows)
    echo("| setting | strategy | seeds | rounds | final accuracy (mean +- std) | downlink round 1 | downlink later rounds |"
         + (" epsilon spent (max) |" if private else ""))
    echo("|---|---|---|---|---|---|---|" + ("---|" if private else ""))
    for r in rows:
        echo(f"| {r['setting']} | {r['strategy']} | {r['runs']} | {r['rounds']} | "
             f"{r['final_accuracy_mean']:.3f} +- {r['final_accuracy_std']:.3f} | {r['downlink_round1_mb']:.2f} MB | "
             f"{r['downlink_later_mb']:.2f} MB |" + (f" {epsilon_text(r['epsilon_max'])} |" if private else ""))
    (dirs[0] / "study.json").write_text(json.dumps(rows, indent=2) + "\n")
    echo(f"wrote {dirs[0] / 'study.json'} and {plot(groups, dirs[0] / 'study.png')}")
    return rows
