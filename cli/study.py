"""``stamen study DIR [DIR ...]``: the accuracy study's table and plot from run directories.

Groups the finished runs under DIR (every planned round in metrics.csv) by (strategy, rank setting) from each run's stamen-config.json:
"homogeneous" when every client has one rank, else "heterogeneous". For each group:
final held-out accuracy (last round of metrics.csv) as mean and sample std over the runs
(seeds), and the downlink bytes per round (round 1, and the mean of later rounds). Writes
``study.json`` and ``study.png`` (held-out accuracy per round, mean over seeds with the
min-max band, one panel per setting) into the first DIR.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from stamen.config import EARLY_EXIT_STRATEGIES

from .exit_study import exit_study
from .fleet_study import fleet_study, is_fleet_run
from .study_runs import epsilon_text, final_epsilon, finished_runs, plot_band, pyplot, run_label, save_figure, setting

COLORS = {"flora": "#55A868", "fedit": "#C44E52", "hetlora": "#8172B2", "flexlora": "#4C72B0"}  # one per strategy, every panel


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


def plot(groups, target: Path) -> Path:
    plt = pyplot()

    kinds = sorted({k for _, k in groups})
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        for (name, k), runs in sorted(groups.items()):
            if k != kind:
                continue
            plot_band(ax, [r["accuracy"] for r in runs], color=COLORS.get(name), label=f"{name} ({len(runs)} seed{'s' if len(runs) > 1 else ''})")
        ax.set_title(f"{kind} ranks")
        ax.set_xlabel("round")
        ax.set_ylabel("held-out accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, target)


def study(dirs: list[str | Path], echo=print, *, target: float = 0.8) -> list[dict]:
    """The LoRA study's table and plot; runs of the early-exit strategies go to
    :func:`cli.exit_study.exit_study` (their own table and plot), runs on a simulated
    clock to :func:`cli.fleet_study.fleet_study` (time to ``target`` accuracy)."""
    dirs = [Path(d) for d in dirs]
    finished = finished_runs(dirs)
    fleet = [f for f in finished if is_fleet_run(f[1])]
    if fleet:
        return fleet_study(fleet, dirs[0], target=target, echo=echo)
    exit_runs = [f for f in finished if f[1].get("strategy.name") in EARLY_EXIT_STRATEGIES]
    lora_runs = [f for f in finished if f[1].get("strategy.name") not in EARLY_EXIT_STRATEGIES]
    if exit_runs:
        rows = exit_study(exit_runs, dirs[0], echo=echo)
        if not lora_runs:
            return rows
    groups = collect(lora_runs)
    if not groups:
        raise FileNotFoundError(f"no run directories (metrics.csv + stamen-config.json) under {', '.join(map(str, dirs))}")
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
