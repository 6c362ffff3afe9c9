"""The fleet study's table and figure (docs/scale.md): runs on a simulated clock
(``simulation.latency-model``), each strategy's held-out accuracy against the fleet's
simulated time, and its time to a target accuracy.

Time to target is the simulated ``elapsed_s`` of the first round whose held-out accuracy
reaches the target (metrics.csv), or "not reached" in the rounds run.
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

from .study_runs import pyplot, run_label, save_figure

COLORS = {"flora": "#55A868", "fedit": "#C44E52", "hetlora": "#8172B2", "flexlora": "#4C72B0", "fedspine": "#DD8452"}


def is_fleet_run(config: dict) -> bool:
    return bool(config.get("simulation.latency-model"))


def time_to(rows: list[dict], target: float) -> tuple[int, float] | None:
    """(round, simulated seconds) of the first round at or above ``target`` accuracy."""
    for r in rows:
        if float(r["eval_accuracy"]) >= target:
            return int(r["round"]), float(r["elapsed_s"])
    return None


def fleet_study(finished: list[tuple[Path, dict, list[dict]]], out_dir: Path, *, target: float, echo=print) -> list[dict]:
    table = []
    for run, config, rows in sorted(finished, key=lambda f: run_label(f[1])):
        rounds = list(csv.DictReader(open(run / "rounds.csv")))
        hit = time_to(rows, target)
        table.append({
            "run": str(run), "strategy": run_label(config), "fleet": config.get("simulation.fleet"),
            "rounds": len(rows) - 1, "final_accuracy": float(rows[-1]["eval_accuracy"]),
            "round_s_median": statistics.median(float(r["round_s"]) for r in rounds),
            "simulated_s": float(rows[-1]["elapsed_s"]),
            "target": target, "round_to_target": hit[0] if hit else None, "time_to_target_s": hit[1] if hit else None,
            "elapsed": [float(r["elapsed_s"]) for r in rows], "accuracy": [float(r["eval_accuracy"]) for r in rows],
        })
    echo(f"fleet: {table[0]['fleet']} (simulated clock: {finished[0][1].get('simulation.latency-model')})")
    echo(f"| strategy | rounds | median round (simulated) | time to {target:.0%} accuracy (simulated) | rounds to it | "
         "final accuracy | total simulated time |")
    echo("|---|---|---|---|---|---|---|")
    for t in table:
        hit = f"{t['time_to_target_s'] / 60:.1f} min" if t["time_to_target_s"] is not None else "not reached"
        echo(f"| {t['strategy']} | {t['rounds']} | {t['round_s_median']:.1f} s | {hit} | {t['round_to_target'] or '-'} | "
             f"{t['final_accuracy']:.3f} | {t['simulated_s'] / 60:.1f} min |")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for t in table:
        name = t["strategy"]
        ax.plot([e / 60 for e in t["elapsed"]], t["accuracy"], marker="o", ms=3, color=COLORS.get(name.split(",")[0]), label=name)
    ax.axhline(target, color="grey", ls="--", lw=1, label=f"target {target:.0%}")
    ax.set_xlabel("simulated time (min): the fleet's, from the latency model")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(f"{table[0]['rounds']} rounds on a simulated fleet")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    figure = save_figure(fig, out_dir / "fleet-study.png")
    (out_dir / "fleet-study.json").write_text(json.dumps(table, indent=2) + "\n")
    echo(f"wrote {out_dir / 'fleet-study.json'} and {figure}")
    return table
