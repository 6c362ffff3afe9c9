"""The FedSpine study's table and figures from its run directories (docs/pruning.md).

    python -m cli.fedspine_study runs/fedspine-study [--target 0.9]

Each subdirectory of the study directory is one row (``bandit``, ``no-pruning``, ...; the
names of conf/fedspine-study/*.toml) holding one finished run. Per row: final held-out
accuracy, the wall-clock time (the ServerApp's ``elapsed_s``, which includes its
evaluation after every round) at which the held-out accuracy first reached ``--target``,
the median round time and the slowest node's median training time; then each row's
time-to-target next to the bandit's. Writes ``fedspine-study.json``,
``fedspine-accuracy.png`` (accuracy against wall-clock time, one line per row) and
``fedspine-arms.png`` (the arm every device played in every round of the bandit row,
from its ``arms.csv``) into the study directory.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from .study_runs import finished_runs, pyplot, save_figure

ORDER = ("bandit", "fixed-p05-r4", "no-pruning", "hetlora")
COLORS = {"bandit": "#C44E52", "fixed-p05-r4": "#4C72B0", "no-pruning": "#55A868", "hetlora": "#8172B2"}


def time_to(curve: list[tuple[float, float]], target: float) -> float:
    """The first wall-clock time at which the accuracy reached ``target``; nan if never."""
    return next((t for t, acc in curve if acc >= target), math.nan)


def load_rows(study_dir: Path) -> dict[str, dict]:
    rows = {}
    for sub in sorted(p for p in study_dir.iterdir() if p.is_dir() and not p.name.startswith("_")):
        runs = finished_runs([sub])
        if not runs:
            continue
        run, config, metrics = runs[-1]
        clients = list(csv.DictReader(open(run / "clients.csv"))) if (run / "clients.csv").is_file() else []
        rounds = list(csv.DictReader(open(run / "rounds.csv"))) if (run / "rounds.csv").is_file() else []
        profiles = json.loads((run / "profiles.json").read_text()) if (run / "profiles.json").is_file() else {}
        arms = list(csv.DictReader(open(run / "arms.csv"))) if (run / "arms.csv").is_file() else []
        rows[sub.name] = {
            "run": str(run),
            "strategy": config["strategy.name"],
            "curve": [(float(m["elapsed_s"]), float(m["eval_accuracy"])) for m in metrics],
            "round_s": [float(r["round_s"]) for r in rounds if r.get("round_s")],
            "train_s": _by_node(clients, "train_s"),
            "profiles": profiles,
            "arms": arms,
        }
    return rows


def _by_node(clients: list[dict], column: str) -> dict[str, list[float]]:
    out: dict[str, list[float]] = defaultdict(list)
    for c in clients:
        if c.get(column):
            out[c["node_id"]].append(float(c[column]))
    return out


def table(rows: dict[str, dict], target: float) -> list[dict]:
    out = []
    for name in sorted(rows, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n)):
        r = rows[name]
        slowest = max((statistics.median(v) for v in r["train_s"].values()), default=math.nan)
        out.append(
            {
                "row": name,
                "strategy": r["strategy"],
                "rounds": len(r["curve"]) - 1,
                "final_accuracy": r["curve"][-1][1],
                "best_accuracy": max(a for _, a in r["curve"]),
                "time_to_target_s": time_to(r["curve"], target),
                "total_s": r["curve"][-1][0],
                "median_round_s": statistics.median(r["round_s"]) if r["round_s"] else math.nan,
                "slowest_node_train_s": slowest,
                "run": r["run"],
            }
        )
    bandit = next((x for x in out if x["row"] == "bandit"), None)
    for x in out:
        x["time_to_target_vs_bandit"] = x["time_to_target_s"] / bandit["time_to_target_s"] if bandit else math.nan
    return out


def plot_accuracy(rows: dict[str, dict], target: float, path: Path) -> Path:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, r in rows.items():
        ax.plot([t / 60 for t, _ in r["curve"]], [a for _, a in r["curve"]], marker="o", ms=3, label=name, color=COLORS.get(name))
    ax.axhline(target, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("wall-clock time (min)")
    ax.set_ylabel("held-out accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_arms(row: dict, path: Path) -> Path:
    """One line per device: the arm (ratio, rank) it played in each round."""
    plt = pyplot()

    labels = sorted({(float(a["ratio"]), int(a["rank"])) for a in row["arms"]})
    by_node: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for a in row["arms"]:
        by_node[a["node_id"]].append((int(a["round"]), labels.index((float(a["ratio"]), int(a["rank"])))))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for i, (node, points) in enumerate(sorted(by_node.items(), key=lambda kv: _device(row, kv[0]))):
        points.sort()
        offset = (i - (len(by_node) - 1) / 2) * 0.08  # devices on the same arm stay visible
        ax.plot([p[0] for p in points], [p[1] + offset for p in points], marker="o", ms=4, label=_device(row, node))
    ax.set_yticks(range(len(labels)), [f"ratio {r:g}, rank {k}" for r, k in labels])
    ax.set_xlabel("round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return save_figure(fig, path)


def _device(row: dict, node: str) -> str:
    p = row["profiles"].get(node, {})
    return f"{p.get('device-class', '?')} p{p.get('partition-id', '?')} ({p.get('network', '?')})"


def study(study_dir: str | Path, *, target: float = 0.9, echo=print) -> list[dict]:
    study_dir = Path(study_dir)
    rows = load_rows(study_dir)
    if not rows:
        raise FileNotFoundError(f"no finished run under {study_dir}/<row>/")
    out = table(rows, target)
    echo(f"| row | final accuracy | best | time to {target:g} | x bandit | total | median round | slowest node's train |")
    echo("|---|---|---|---|---|---|---|---|")
    for x in out:
        echo(f"| {x['row']} | {x['final_accuracy']:.3f} | {x['best_accuracy']:.3f} | {x['time_to_target_s']:.0f} s | "
             f"{x['time_to_target_vs_bandit']:.2f} | {x['total_s']:.0f} s | {x['median_round_s']:.1f} s | {x['slowest_node_train_s']:.1f} s |")
    (study_dir / "fedspine-study.json").write_text(json.dumps(out, indent=2) + "\n")
    written = [plot_accuracy(rows, target, study_dir / "fedspine-accuracy.png")]
    if "bandit" in rows and rows["bandit"]["arms"]:
        written.append(plot_arms(rows["bandit"], study_dir / "fedspine-arms.png"))
    echo("wrote " + ", ".join(str(p) for p in [study_dir / "fedspine-study.json", *written]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study_dir")
    parser.add_argument("--target", type=float, default=0.9, help="held-out accuracy of the time-to-target column")
    args = parser.parse_args()
    study(args.study_dir, target=args.target)


if __name__ == "__main__":
    main()
