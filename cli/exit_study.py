"""The early-exit study's table and plot from run directories (``stamen study`` hands the
ReeFL / DepthFL / InclusiveFL / ExclusiveFL runs here).

Finished runs (every planned round in metrics.csv; cli.study_runs.finished_runs) are
grouped by (data.name, strategy.name with its DP mode, e.g. "reefl, local DP eps 8").
Per group: the final round's accuracy averaged over the exits, each exit's, and the
ensemble's, as mean and sample std over the runs (seeds); the early-exit inference
curve (accuracy against the share of blocks run, one point per confidence threshold) of
the final round, averaged over the runs; under DP, the largest epsilon any node spent.
Writes ``exit_study.json`` and ``exit_study.png`` into the first directory.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections import defaultdict
from pathlib import Path

from .study_runs import epsilon_text, final_epsilon, plot_band, pyplot, run_label, save_figure

COLORS = {"reefl": "#55A868", "depthfl": "#4C72B0", "inclusivefl": "#8172B2", "exclusivefl": "#C44E52"}
ORDER = ("reefl", "depthfl", "inclusivefl", "exclusivefl")


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def collect(finished: list[tuple[Path, dict, list[dict]]]) -> dict[tuple[str, str], list[dict]]:
    """Group finished runs (cli.study_runs.finished_runs) by (data, strategy with its DP mode)."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for run, config, rows in finished:
        last = rows[-1]
        exits = sorted(int(m.group(1)) for k in last if (m := re.fullmatch(r"eval_accuracy_exit(\d+)", k)))
        thresholds = sorted(float(m.group(1)) for k in last if (m := re.fullmatch(r"eval_accuracy_at_(.+)", k)))
        groups[(config["data.name"], run_label(config))].append(
            {
                "run": str(run),
                "seed": config.get("train.seed"),
                "mean": [float(r["eval_accuracy_mean"]) for r in rows],
                "exits": [float(last[f"eval_accuracy_exit{j}"]) for j in exits],
                "ensemble": float(last["eval_accuracy_ensemble"]),
                "curve": [(float(last[f"eval_blocks_at_{t:g}"]), float(last[f"eval_accuracy_at_{t:g}"])) for t in thresholds],
                "thresholds": thresholds,
                "epsilon": final_epsilon(run),
            }
        )
    return groups


def _strategy(label: str) -> str:
    """"reefl, local DP eps 8" -> "reefl" (cli.study_runs.run_label)."""
    return label.split(",")[0]


def _key(item):
    (data, label), _ = item
    name = _strategy(label)
    return data, ORDER.index(name) if name in ORDER else len(ORDER), label


def table(groups) -> list[dict]:
    out = []
    for (data, name), runs in sorted(groups.items(), key=_key):
        mean, std = _stats([r["mean"][-1] for r in runs])
        ens, ens_std = _stats([r["ensemble"] for r in runs])
        n_exits = min(len(r["exits"]) for r in runs)
        out.append(
            {
                "data": data,
                "strategy": name,
                "runs": len(runs),
                "seeds": sorted(r["seed"] for r in runs),
                "rounds": len(runs[0]["mean"]) - 1,
                "final_mean_accuracy": mean,
                "final_mean_accuracy_std": std,
                "final_exit_accuracy": [statistics.mean(r["exits"][j] for r in runs) for j in range(n_exits)],
                "final_ensemble_accuracy": ens,
                "final_ensemble_accuracy_std": ens_std,
                "early_exit": [
                    {"threshold": t, "blocks": statistics.mean(r["curve"][i][0] for r in runs), "accuracy": statistics.mean(r["curve"][i][1] for r in runs)}
                    for i, t in enumerate(runs[0]["thresholds"])
                ],
                "epsilon_max": max((r["epsilon"] for r in runs), default=math.nan),
            }
        )
    return out


def plot(groups, rows: list[dict], target: Path) -> Path:
    plt = pyplot()
    from matplotlib.colors import to_rgba

    datasets = sorted({d for d, _ in groups})
    fig, axes = plt.subplots(len(datasets), 3, figsize=(15, 4.2 * len(datasets)), squeeze=False)
    for ax_row, data in zip(axes, datasets, strict=True):
        for (d, name), runs in sorted(groups.items(), key=_key):
            if d != data:
                continue
            color = COLORS.get(_strategy(name))
            if name != _strategy(name):  # the same method under DP: a lighter shade
                color = to_rgba(color or "grey", 0.55)
            plot_band(ax_row[0], [r["mean"] for r in runs], color=color, label=f"{name} ({len(runs)} seeds)")
            row = next(r for r in rows if r["data"] == data and r["strategy"] == name)
            ax_row[1].plot(range(1, len(row["final_exit_accuracy"]) + 1), row["final_exit_accuracy"], marker="o", color=color, label=name)
            ax_row[2].plot([p["blocks"] for p in row["early_exit"]], [p["accuracy"] for p in row["early_exit"]], marker="o", color=color, label=name)
        ax_row[0].set(title=f"{data}: accuracy (mean over exits) per round", xlabel="round", ylabel="held-out accuracy")
        ax_row[1].set(title=f"{data}: final accuracy per exit", xlabel="exit", ylabel="held-out accuracy")
        ax_row[2].set(title=f"{data}: early-exit inference (thresholds)", xlabel="share of blocks run", ylabel="accuracy")
        for ax in ax_row:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    return save_figure(fig, target, dpi=110)


def exit_study(finished: list[tuple[Path, dict, list[dict]]], out_dir: Path, echo=print) -> list[dict]:
    groups = collect(finished)
    if not groups:
        raise FileNotFoundError(f"no finished early-exit runs under {out_dir}")
    rows = table(groups)
    private = any(not math.isnan(r["epsilon_max"]) for r in rows)
    echo("| data | strategy | seeds | rounds | mean over exits | per exit | ensemble | at threshold 0.9: accuracy / blocks run |"
         + (" epsilon spent (max) |" if private else ""))
    echo("|---|---|---|---|---|---|---|---|" + ("---|" if private else ""))
    for r in rows:
        at = next((p for p in r["early_exit"] if p["threshold"] == 0.9), None)
        at_text = f"{at['accuracy']:.3f} / {at['blocks']:.0%}" if at else "-"
        echo(
            f"| {r['data']} | {r['strategy']} | {r['runs']} | {r['rounds']} | "
            f"{r['final_mean_accuracy']:.3f} +- {r['final_mean_accuracy_std']:.3f} | "
            f"{' '.join(f'{a:.3f}' for a in r['final_exit_accuracy'])} | "
            f"{r['final_ensemble_accuracy']:.3f} +- {r['final_ensemble_accuracy_std']:.3f} | {at_text} |"
            + (f" {epsilon_text(r['epsilon_max'])} |" if private else "")
        )
    (out_dir / "exit_study.json").write_text(json.dumps(rows, indent=2) + "\n")
    echo(f"wrote {out_dir / 'exit_study.json'} and {plot(groups, rows, out_dir / 'exit_study.png')}")
    return rows
