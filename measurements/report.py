"""``stamen report RUN_DIR [RUN_DIR ...]``: where each round's time went.

Reads a run's rounds.csv and clients.csv (written by the ServerApp), prints a summary
(per phase: median, p95 and share of the round; by device class and by network) and
writes PNGs next to the CSVs:

* ``phases_per_round.png``: per round, one stacked bar per client of downlink, train,
  uplink, wait, plus the server's aggregation (the 5G paper's figure);
* ``round_time_cdf.png``: the CDF of round times;
* with several run dirs, ``comparison.png`` in ``--out``: the mean time per phase of
  each run side by side (e.g. 5G vs WiFi vs Ethernet), and the uplink ratios.

The text and the plot split a client-round into parts that add up to its end-to-end time
(``round_parts``): downlink, start-up (the ClientApp process's start or fork and the
handler's load phase, less what the process spent waiting for the message), the training
loop, the rest of the handler (serialize), uplink, and polling (the rest of wait_s:
Flower's polls and queueing). ``overhead`` is start-up plus polling: what a round costs
beyond its training and its transfers.

"Share of the round" of a client phase is its total over all client rows divided by
the total of the round times those rows belong to; for aggregation it is the total
aggregation time over the total round time.

Transfers, per network: the medians of each downlink's and uplink's bytes on the wire,
Fleet RPCs, time and goodput (bytes x 8 / time of that transfer), and the goodput over the
link's rate where the node's config names the rate (the emulated testbed does:
``link-down-mbit`` / ``link-up-mbit``).
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .tables import ACCEPTED

CLIENT_PHASES = ("downlink_s", "train_s", "uplink_s", "wait_s")
ROUND_PARTS = ("downlink_s", "startup_s", "loop_s", "handler_rest_s", "uplink_s", "poll_s")  # sum: e2e_s
PART_LABELS = {"startup_s": "start-up", "handler_rest_s": "serialize", "poll_s": "polling"}
PHASE_COLORS = {
    "downlink_s": "#4C72B0",
    "train_s": "#55A868",
    "startup_s": "#DD8452",
    "loop_s": "#55A868",
    "handler_rest_s": "#8C8C3C",
    "uplink_s": "#C44E52",
    "wait_s": "#BBBBBB",
    "poll_s": "#BBBBBB",
    "aggregation_s": "#8172B2",
    "unsplit_s": "#E5C07B",
}


def _num(text: str | None) -> float | None:
    if text is None or text == "":
        return None
    try:
        return float(text)
    except ValueError:
        return None


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), 0 <= q <= 100."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class Run:
    path: Path
    label: str
    rounds: list[dict] = field(default_factory=list)
    clients: list[dict] = field(default_factory=list)

    @classmethod
    def load(cls, path: str | Path, label: str | None = None) -> Run:
        path = Path(path)
        missing = [n for n in ("rounds.csv", "clients.csv") if not (path / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{path} is not a run directory: {', '.join(missing)} missing")
        rounds = list(csv.DictReader(open(path / "rounds.csv")))
        clients = list(csv.DictReader(open(path / "clients.csv")))
        if label is None:
            networks = sorted({c.get("network", "") for c in clients} - {"", "unknown"})
            label = "/".join(networks) if networks else path.name
        return cls(path, label, rounds, clients)

    def round_time(self) -> dict[str, float]:
        return {r["round"]: float(r["round_s"]) for r in self.rounds if _num(r.get("round_s")) is not None}


def round_parts(row: dict) -> dict[str, float]:
    """A clients.csv row's end-to-end time in ``ROUND_PARTS`` (they add up to e2e_s), plus
    ``overhead_s`` (start-up + polling); {} when the row lacks the transfer or phase split.

    Start-up is app_start_s - message_wait_s + load_s: the process start (or the warm
    runtime's fork) and the load phase, without the time the process waited for the
    message (that wait runs while the SuperNode downloads it, so it is downlink or
    polling already). Polling is wait_s less that start-up part."""
    v = {k: _num(row.get(k)) for k in ("downlink_s", "train_s", "uplink_s", "wait_s", "load_s", "loop_s", "app_start_s")}
    if any(x is None for x in v.values()):
        return {}
    started = max(0.0, v["app_start_s"] - (_num(row.get("message_wait_s")) or 0.0))
    parts = {
        "downlink_s": v["downlink_s"],
        "startup_s": started + v["load_s"],
        "loop_s": v["loop_s"],
        "handler_rest_s": v["train_s"] - v["load_s"] - v["loop_s"],
        "uplink_s": v["uplink_s"],
        "poll_s": v["wait_s"] - started,
    }
    parts["overhead_s"] = parts["startup_s"] + parts["poll_s"]
    return parts


def phase_stats(run: Run, rows: list[dict] | None = None) -> dict[str, dict[str, float]]:
    """phase -> {n, median, p95, share} over ``rows`` (default: all client rows that
    replied), for CLIENT_PHASES, ROUND_PARTS and overhead_s."""
    rows = [r for r in (run.clients if rows is None else rows) if r.get("status") in ACCEPTED]
    rows = [{**r, **round_parts(r)} for r in rows]
    round_s = run.round_time()
    out: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys((*CLIENT_PHASES, *ROUND_PARTS, "overhead_s")):
        pairs = [(v, round_s.get(r["round"])) for r in rows if (v := _num(r.get(name))) is not None]
        values = [v for v, _ in pairs]
        denominators = [d for _, d in pairs if d]
        out[name] = {
            "n": len(values),
            "median": percentile(values, 50),
            "p95": percentile(values, 95),
            "share": sum(v for v, d in pairs if d) / sum(denominators) if denominators else math.nan,
        }
    agg = [float(r["aggregation_s"]) for r in run.rounds if _num(r.get("aggregation_s")) is not None]
    total_round = sum(round_s.values())
    out["aggregation_s"] = {
        "n": len(agg),
        "median": percentile(agg, 50),
        "p95": percentile(agg, 95),
        "share": sum(agg) / total_round if total_round else math.nan,
    }
    rt = list(round_s.values())
    out["round_s"] = {"n": len(rt), "median": percentile(rt, 50), "p95": percentile(rt, 95), "share": 1.0 if rt else math.nan}
    return out


def transfer_stats(rows: list[dict]) -> dict[str, dict[str, float]]:
    """direction -> {n, mb, rpcs, seconds, goodput_mbit[, rate_mbit, of_rate]}: medians over
    the rows that replied and timed that transfer."""
    out = {}
    for direction, side in (("downlink", "down"), ("uplink", "up")):
        timed = [
            (b, s, _num(r.get(f"rpcs_{side}")), _num(r.get(f"link_{side}_mbit")))
            for r in rows
            if r.get("status") in ACCEPTED and (b := _num(r.get(f"bytes_{side}"))) and (s := _num(r.get(f"{direction}_s")))
        ]
        if not timed:
            continue
        stats = {
            "n": len(timed),
            "mb": percentile([b / 1e6 for b, _, _, _ in timed], 50),
            "rpcs": percentile([c for _, _, c, _ in timed if c is not None], 50),
            "seconds": percentile([s for _, s, _, _ in timed], 50),
            "goodput_mbit": percentile([b * 8 / s / 1e6 for b, s, _, _ in timed], 50),
        }
        rated = [(b * 8 / s / 1e6, rate) for b, s, _, rate in timed if rate]
        if rated:
            stats["rate_mbit"] = percentile([rate for _, rate in rated], 50)
            stats["of_rate"] = percentile([g / rate for g, rate in rated], 50)
        out[direction] = stats
    return out


def summarize(run: Run) -> dict:
    groups: dict[str, dict[str, dict]] = {}
    for column in ("device_class", "network"):
        by: dict[str, list[dict]] = defaultdict(list)
        for r in run.clients:
            by[r.get(column) or "unknown"].append(r)
        groups[column] = {name: phase_stats(run, rows) for name, rows in sorted(by.items())}
    unavailable = sorted({r["node_id"] for r in run.clients if r.get("transfer_via") == "unavailable"})
    starts: dict[str, int] = defaultdict(int)
    for r in run.clients:
        if r.get("status") in ACCEPTED:
            starts[r.get("start") or "unknown"] += 1
    by_network: dict[str, list[dict]] = defaultdict(list)
    for r in run.clients:
        by_network[r.get("network") or "unknown"].append(r)
    return {
        "run": str(run.path),
        "label": run.label,
        "overall": phase_stats(run),
        "groups": groups,
        "transfers": {name: stats for name, rows in sorted(by_network.items()) if (stats := transfer_stats(rows))},
        "no_transfer_timing": unavailable,
        "starts": dict(sorted(starts.items())),
        "clocks": sorted({r.get("clock") or "measured" for r in run.clients}),
    }


def format_summary(summary: dict) -> str:
    def table(stats: dict[str, dict[str, float]]) -> list[str]:
        split = stats.get("startup_s", {}).get("n", 0) > 0  # rows with transfer and phase timing
        names = (*ROUND_PARTS, "overhead_s") if split else CLIENT_PHASES
        names = [n for n in (*names, "aggregation_s", "round_s") if n in stats]
        lines = [f"    {'phase':<15}{'n':>5}{'median s':>11}{'p95 s':>10}{'share':>9}"]
        for name in names:
            s = stats[name]
            share = "" if math.isnan(s["share"]) else f"{100 * s['share']:.1f}%"
            med = "n/a" if math.isnan(s["median"]) else f"{s['median']:.3f}"
            p95 = "n/a" if math.isnan(s["p95"]) else f"{s['p95']:.3f}"
            label = PART_LABELS.get(name, name[:-2]) if name != "overhead_s" else "(overhead)"
            lines.append(f"    {label:<15}{s['n']:>5}{med:>11}{p95:>10}{share:>9}")
        return lines

    out = [f"run {summary['run']} ({summary['label']})"]
    clocks = [c for c in summary.get("clocks", []) if c != "measured"]
    if clocks:  # the truth at a glance: these seconds were not all measured on this host
        out.append(f"  clock: {', '.join(summary.get('clocks', []))} (docs/scale.md: simulated = every phase from the latency model; "
                   "emulated = training padded to the emulated device's time)")
    out += ["  all clients:", *table(summary["overall"])]
    out.append(
        "    start-up = ClientApp process start (or fork) + load; polling = Flower's polls and queueing; "
        "overhead = start-up + polling"
    )
    if summary.get("starts"):
        out.append("    ClientApp starts: " + ", ".join(f"{n} {kind}" for kind, n in summary["starts"].items()))
    for column, groups in summary["groups"].items():
        if len(groups) < 2 and column != "device_class":
            continue  # one group: the same figures as above
        for name, stats in groups.items():
            client_only = {k: v for k, v in stats.items() if k not in ("aggregation_s", "round_s")}
            out += [f"  {column} = {name}:", *table(client_only)]
    if summary.get("transfers"):
        out.append("  transfers (medians per client and round; goodput = bytes on the wire x 8 / transfer time):")
        out.append(f"    {'network':<12}{'direction':<10}{'n':>4}{'MB':>9}{'RPCs':>6}{'s':>8}{'Mbit/s':>9}  of the link's rate")
        for network, directions in summary["transfers"].items():
            for direction, s in directions.items():
                rate = f"  {s['of_rate']:.2f} of {s['rate_mbit']:g}" if "of_rate" in s else "  (rate not known)"
                rpcs = "" if math.isnan(s["rpcs"]) else f"{s['rpcs']:.0f}"
                out.append(f"    {network:<12}{direction:<10}{s['n']:>4}{s['mb']:>9.3f}{rpcs:>6}{s['seconds']:>8.3f}{s['goodput_mbit']:>9.1f}{rate}")
    if summary["no_transfer_timing"]:
        out.append(
            "  nodes without transfer timing (plain flower-supernode or simulation): "
            + ", ".join(summary["no_transfer_timing"])
            + " -- their downlink/uplink/wait are not split"
        )
    return "\n".join(out)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_phases_per_round(run: Run, target: Path) -> Path:
    plt = _plt()
    agg = {r["round"]: float(r["aggregation_s"]) for r in run.rounds if _num(r.get("aggregation_s")) is not None}
    rows = sorted((r for r in run.clients if r.get("status") in ACCEPTED), key=lambda r: (int(r["round"]), r["node_id"]))
    nodes = sorted({r["node_id"] for r in rows})
    short = {n: f"n{i}" for i, n in enumerate(nodes)}
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(rows) + 2), 4.5))
    x, ticks, labels, used = 0.0, [], [], set()
    last_round = None
    for r in rows:
        if last_round is not None and r["round"] != last_round:
            x += 0.6  # a gap between rounds
        last_round = r["round"]
        bottom = 0.0
        split = round_parts(r)
        if split:
            parts = [(p, split[p]) for p in ROUND_PARTS]
        elif _num(r.get("downlink_s")) is not None:
            parts = [(p, _num(r.get(p)) or 0.0) for p in CLIENT_PHASES]
        else:
            parts = [
                ("train_s", _num(r.get("train_s")) or 0.0),
                ("unsplit_s", (_num(r.get("e2e_s")) or 0.0) - (_num(r.get("train_s")) or 0.0)),
            ]
        parts.append(("aggregation_s", agg.get(r["round"], 0.0)))
        for name, value in parts:
            label = None if name in used else {"unsplit_s": "downlink+uplink+wait (not split)", **PART_LABELS}.get(name, name[:-2])
            used.add(name)
            ax.bar(x, value, bottom=bottom, color=PHASE_COLORS[name], width=0.8, label=label)
            bottom += value
        ticks.append(x)
        labels.append(f"r{r['round']}\n{short[r['node_id']]}")
        x += 1.0
    ax.set_xticks(ticks, labels, fontsize=8)
    ax.set_ylabel("seconds")
    ax.set_title(f"Where each round's time went, per client ({run.label})")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(target, dpi=120)
    plt.close(fig)
    return target


def plot_round_cdf(runs: list[Run], target: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        xs = sorted(run.round_time().values())
        if xs:
            ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=run.label)
    ax.set_xlabel("round time (s)")
    ax.set_ylabel("fraction of rounds")
    ax.set_ylim(0, 1.02)
    ax.set_title("CDF of round times")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(target, dpi=120)
    plt.close(fig)
    return target


def stragglers(run: Run) -> dict[str, float | str]:
    """The straggler effect: a synchronous round lasts as long as its slowest node.

    Per round, the slowest node's e2e time against the median and the fastest node's
    and against the round time, and ``idle_share``: the mean over nodes of the part of
    the round a node spends done and waiting for the others (1 - e2e / round); averaged
    over rounds. ``slowest_class``: the device class that was the slowest most often.
    """
    by_round: dict[str, list[dict]] = defaultdict(list)
    for r in run.clients:
        if r.get("status") in ACCEPTED and _num(r.get("e2e_s")) is not None:
            by_round[r["round"]].append(r)
    round_s = run.round_time()
    slow_over_median, slow_over_fast, slow_over_round, idle, who = [], [], [], [], defaultdict(int)
    for rnd, rows in by_round.items():
        e2e = sorted(float(r["e2e_s"]) for r in rows)
        slowest = max(rows, key=lambda r: float(r["e2e_s"]))
        who[slowest.get("device_class") or "unknown"] += 1
        slow_over_median.append(e2e[-1] / percentile(e2e, 50))
        slow_over_fast.append(e2e[-1] / e2e[0])
        if round_s.get(rnd):
            slow_over_round.append(e2e[-1] / round_s[rnd])
            idle.append(sum(max(0.0, 1 - t / round_s[rnd]) for t in e2e) / len(e2e))
    mean = lambda xs: sum(xs) / len(xs) if xs else math.nan  # noqa: E731
    return {
        "slowest_over_median_e2e": mean(slow_over_median),
        "slowest_over_fastest_e2e": mean(slow_over_fast),
        "slowest_e2e_over_round": mean(slow_over_round),
        "idle_share": mean(idle),
        "slowest_class": max(who, key=who.get) if who else "",
    }


def compare(runs: list[Run]) -> dict:
    """Mean seconds and share of the round per phase per run, the straggler effect, and
    uplink ratios between every pair of runs."""
    means, shares, straggling = {}, {}, {}
    for run in runs:
        stats_by_phase = phase_stats(run)
        shares[run.label] = {name: stats_by_phase[name]["share"] for name in (*CLIENT_PHASES, "aggregation_s")}
        straggling[run.label] = stragglers(run)
        stats = {}
        ok = [r for r in run.clients if r.get("status") in ACCEPTED]
        for name in CLIENT_PHASES:
            values = [v for r in ok if (v := _num(r.get(name))) is not None]
            stats[name] = sum(values) / len(values) if values else math.nan
        agg = [float(r["aggregation_s"]) for r in run.rounds if _num(r.get("aggregation_s")) is not None]
        stats["aggregation_s"] = sum(agg) / len(agg) if agg else math.nan
        rt = list(run.round_time().values())
        stats["round_s"] = sum(rt) / len(rt) if rt else math.nan
        means[run.label] = stats
    ratios = {
        f"{a}/{b}": means[a]["uplink_s"] / means[b]["uplink_s"]
        for a in means
        for b in means
        if a != b and means[b]["uplink_s"] and not math.isnan(means[b]["uplink_s"])
    }
    return {"mean_s": means, "share_of_round": shares, "stragglers": straggling, "uplink_ratio": ratios}


def plot_comparison(runs: list[Run], target: Path) -> Path:
    plt = _plt()
    table = compare(runs)["mean_s"]
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(runs) + 2), 4.5))
    for i, stats in enumerate(table.values()):
        bottom = 0.0
        for name in (*CLIENT_PHASES, "aggregation_s"):
            value = 0.0 if math.isnan(stats[name]) else stats[name]
            ax.bar(i, value, bottom=bottom, color=PHASE_COLORS[name], width=0.6, label=name[:-2] if i == 0 else None)
            bottom += value
    ax.set_xticks(range(len(table)), list(table), fontsize=9)
    ax.set_ylabel("mean seconds per client and round")
    ax.set_title("Phases side by side")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(target, dpi=120)
    plt.close(fig)
    return target


def report(paths: list[str | Path], *, labels: list[str] | None = None, out: str | Path | None = None, echo=print) -> list[Path]:
    if not paths:
        raise ValueError("give at least one run directory")
    if labels and len(labels) != len(paths):
        raise ValueError(f"{len(labels)} labels for {len(paths)} run directories")
    runs = [Run.load(p, labels[i] if labels else None) for i, p in enumerate(paths)]
    written = []
    for run in runs:
        summary = summarize(run)
        echo(format_summary(summary))
        (run.path / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        written += [run.path / "summary.json", plot_phases_per_round(run, run.path / "phases_per_round.png")]
        written.append(plot_round_cdf([run], run.path / "round_time_cdf.png"))
    if len(runs) > 1:
        target = Path(out) if out else runs[0].path.parent / "comparison"
        target.mkdir(parents=True, exist_ok=True)
        table = compare(runs)
        (target / "comparison.json").write_text(json.dumps(table, indent=2) + "\n")
        written += [target / "comparison.json", plot_comparison(runs, target / "comparison.png")]
        written.append(plot_round_cdf(runs, target / "round_time_cdf.png"))
        echo("comparison (mean seconds per client and round):")
        for label, stats in table["mean_s"].items():
            echo(f"  {label:<20}" + "  ".join(f"{k[:-2]} {v:.3f}" for k, v in stats.items() if k.endswith("_s")))
        echo("share of the round per phase:")
        for label, shares in table["share_of_round"].items():
            echo(f"  {label:<20}" + "  ".join(f"{k[:-2]} {100 * v:.1f}%" for k, v in shares.items() if not math.isnan(v)))
        echo("stragglers (round time = the slowest node):")
        for label, st in table["stragglers"].items():
            echo(f"  {label:<20}slowest/fastest node e2e {st['slowest_over_fastest_e2e']:.2f}x, "
                 f"slowest/median {st['slowest_over_median_e2e']:.2f}x, slowest e2e/round {st['slowest_e2e_over_round']:.2f}, "
                 f"nodes idle {100 * st['idle_share']:.0f}% of the round, slowest class most often: {st['slowest_class']}")
        for pair, ratio in table["uplink_ratio"].items():
            echo(f"  uplink time ratio {pair}: {ratio:.2f}x")
    for path in written:
        echo(f"wrote {path}")
    return written
