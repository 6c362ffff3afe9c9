"""A latency model fitted from measured rounds, and what it predicts for a client-round.

``stamen calibrate runs/A runs/B ...`` fits one from the clients.csv of real or testbed
runs (:func:`rows_of_run`, :func:`fit`); ``stamen simulate --latency-model FILE`` runs
the simulated clock on it (measurements/clock.py). docs/scale.md describes the file.

A client-round is four phases, each owned by one part of the model:

* **train** (per device): ``startup_s + steps * (step_s + step_per_rank_s * rank +
  step_per_prune_s * prune_ratio + step_by_strategy[strategy])``: a strategy whose
  device side does more per step than the most common one of the runs (FedSpine scores
  units and measures losses before and after pruning) gets its own offset, so that its
  overhead is not read as the cost of pruning. The step cost is fitted on the handler's training
  loop (``loop_s / steps``) by least squares; start-up is the rest of the handler
  (loading, serializing), its median.
* **downlink / uplink** (per network and direction, plus the device): ``latency_s + 8 *
  bytes / (mbit * 1e6) + device's downlink_extra_s / uplink_extra_s`` over the ArrayRecord
  payload, so framing is part of the rate. The link is fitted by least squares where the
  payload sizes spread (FLoRA's dense and stacked downlinks, FedSpine's ranks); where they
  do not, the link's configured rate is used and only the latency is fitted (the file
  says which). The device's extra is the median of what its transfers took beyond its
  links' fit: the RPCs cost CPU, and a Pi's share of it is slower than a GPU server's.
* **wait** (per device): Flower's polling and queueing around the message, its median.

and the server's own part of a round (``server_s``: building messages, aggregating, the
last poll) is the median of rounds.csv's ``round_s`` minus the slowest client. Pure
arithmetic on plain rows: tested on synthetic rows with known parameters.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "stamen-latency-model/1"
PHASES = ("downlink_s", "train_s", "uplink_s", "wait_s")
SPREAD = 1.2  # payload sizes whose largest is below this x the smallest cannot give a rate
SUPPORT = 3  # a coefficient needs at least this many rows away from its input's most common value


class LatencyModelError(ValueError):
    """A latency model that cannot be fitted or used; the message says what is missing."""


@dataclass(frozen=True)
class DeviceModel:
    startup_s: float
    step_s: float
    step_per_rank_s: float = 0.0
    step_per_prune_s: float = 0.0
    wait_s: float = 0.0
    rows: int = 0
    device_class: str = ""  # its class (lora.rank-by-class keys): what a simulated node of this device reports
    step_by_strategy: dict[str, float] = field(default_factory=dict)  # strategy -> extra seconds per step
    downlink_extra_s: float = 0.0  # its transfers beyond the link's time (the RPCs' CPU on this device)
    uplink_extra_s: float = 0.0

    def train_s(self, steps: int, rank: float, prune: float, strategy: str = "") -> float:
        per_step = self.step_s + self.step_per_rank_s * rank + self.step_per_prune_s * prune + self.step_by_strategy.get(strategy, 0.0)
        return self.startup_s + steps * max(0.0, per_step)


@dataclass(frozen=True)
class LinkModel:
    latency_s: float
    mbit: float
    fitted: str = "slope"  # "slope": both from the data; "link rate": the configured rate, the latency fitted
    rows: int = 0

    def transfer_s(self, payload_bytes: float) -> float:
        return self.latency_s + 8.0 * payload_bytes / (self.mbit * 1e6)


@dataclass(frozen=True)
class LatencyModel:
    devices: dict[str, DeviceModel]
    down: dict[str, LinkModel]  # network -> SuperLink-to-device link
    up: dict[str, LinkModel]
    steps: int  # train.local-steps of the runs it was fitted on (a simulation may train another number)
    workload: dict[str, Any] = field(default_factory=dict)  # model.path, batch size, sequence length of those runs
    server_s: float = 0.0
    fitted_from: list[str] = field(default_factory=list)
    error: dict[str, float] = field(default_factory=dict)  # phase -> median absolute relative error on the fitting rows

    def device(self, name: str) -> DeviceModel:
        """The device's part of the model; LatencyModelError naming the devices it has."""
        if name not in self.devices:
            raise LatencyModelError(f"device {name!r} is not in the latency model (it has {', '.join(sorted(self.devices))})")
        return self.devices[name]

    def link(self, network: str) -> tuple[LinkModel, LinkModel]:
        """(down, up) of the network; LatencyModelError naming the networks it has."""
        if network not in self.down or network not in self.up:
            raise LatencyModelError(f"network {network!r} is not in the latency model (it has {', '.join(sorted(self.down))})")
        return self.down[network], self.up[network]

    def phases(self, device: str, network: str, *, steps: int, rank: float, prune: float, bytes_down: float,
               bytes_up: float, strategy: str = "") -> dict[str, float]:
        """The predicted seconds of each phase of one client-round, and ``e2e_s`` (their sum)."""
        d, (down, up) = self.device(device), self.link(network)
        out = {
            "downlink_s": max(0.0, down.transfer_s(bytes_down) + d.downlink_extra_s),
            "train_s": d.train_s(steps, rank, prune, strategy),
            "uplink_s": max(0.0, up.transfer_s(bytes_up) + d.uplink_extra_s),
            "wait_s": d.wait_s,
        }
        out["e2e_s"] = sum(out[p] for p in PHASES)
        return out

    # --- the file -------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "steps": self.steps,
            "workload": self.workload,
            "server_s": self.server_s,
            "devices": {k: asdict(v) for k, v in sorted(self.devices.items())},
            "down": {k: asdict(v) for k, v in sorted(self.down.items())},
            "up": {k: asdict(v) for k, v in sorted(self.up.items())},
            "fitted_from": self.fitted_from,
            "error": self.error,
        }

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> LatencyModel:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise LatencyModelError(f"latency model {path}: cannot be read ({err}); write one with `stamen calibrate`") from None
        if data.get("format") != FORMAT:
            raise LatencyModelError(f"latency model {path}: format {data.get('format')!r}, expected {FORMAT!r}")
        return cls(
            devices={k: DeviceModel(**v) for k, v in data["devices"].items()},
            down={k: LinkModel(**v) for k, v in data["down"].items()},
            up={k: LinkModel(**v) for k, v in data["up"].items()},
            steps=int(data["steps"]), workload=dict(data.get("workload", {})), server_s=float(data.get("server_s", 0.0)),
            fitted_from=list(data.get("fitted_from", [])), error=dict(data.get("error", {})),
        )


# --- fitting --------------------------------------------------------------------------------------


def supported(values: np.ndarray) -> bool:
    """At least SUPPORT values differ from the most common one: enough to fit a slope on."""
    _, counts = np.unique(values, return_counts=True)
    return len(values) - counts.max() >= SUPPORT


def least_squares(columns: Mapping[str, Iterable[float]], target: Iterable[float]) -> dict[str, float]:
    """Coefficients of ``target ~ sum(c * column)``. A column that (almost) never moves
    gets 0, not a guess: all one value is inseparable from the intercept ``"1"``, and one
    or two rows away from it would make the slope their noise (:func:`supported`).
    ``columns`` must include "1"."""
    y = np.asarray(list(target), dtype=float)
    cols = {k: np.asarray(list(v), dtype=float) for k, v in columns.items()}
    used = [k for k, v in cols.items() if k == "1" or supported(v)]
    x = np.stack([cols[k] for k in used], axis=1)
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    out = dict.fromkeys(cols, 0.0)
    out.update({k: float(c) for k, c in zip(used, coef, strict=True)})
    return out


def fit_device(rows: list[dict]) -> DeviceModel:
    """``rows``: dicts with steps, rank, prune, strategy, train_s, loop_s, wait_s."""
    per_step = [r["loop_s"] / r["steps"] for r in rows]
    strategies = [r.get("strategy", "") for r in rows]
    others = sorted(set(strategies) - {statistics.mode(strategies)})  # the most common is the reference
    columns = {"1": [1.0] * len(rows), "rank": [r["rank"] for r in rows], "prune": [r["prune"] for r in rows]}
    columns.update({f"strategy:{s}": [float(x == s) for x in strategies] for s in others})
    c = least_squares(columns, per_step)
    if c["rank"] < 0:  # a higher rank never trains faster: a negative slope is the runs' noise; fit without it
        c = least_squares({k: v for k, v in columns.items() if k != "rank"} | {"rank": [0.0] * len(rows)}, per_step)
    return DeviceModel(
        startup_s=statistics.median(r["train_s"] - r["loop_s"] for r in rows),
        step_s=c["1"], step_per_rank_s=c["rank"], step_per_prune_s=c["prune"],
        wait_s=statistics.median(r["wait_s"] for r in rows), rows=len(rows),
        device_class=statistics.mode(r.get("device_class", "") for r in rows),
        step_by_strategy={s: c[f"strategy:{s}"] for s in others if c[f"strategy:{s}"] != 0.0},
    )


def fit_link(sizes: list[float], seconds: list[float], link_mbit: list[float]) -> LinkModel:
    """Latency and rate of one direction of one network from (payload bytes, seconds)."""
    if min(sizes) > 0 and max(sizes) >= SPREAD * min(sizes):
        c = least_squares({"1": [1.0] * len(sizes), "bytes": sizes}, seconds)
        if c["bytes"] > 0:
            return LinkModel(latency_s=max(0.0, c["1"]), mbit=8.0 / (c["bytes"] * 1e6), fitted="slope", rows=len(sizes))
    rates = [m for m in link_mbit if m and m > 0]
    if not rates:
        raise LatencyModelError(
            f"the payloads ({min(sizes):.0f} to {max(sizes):.0f} bytes) do not spread enough to fit a rate, and the runs name no "
            "link rate (link_down_mbit / link_up_mbit): add a run with other payload sizes (another rank, or FLoRA's stacked rounds)"
        )
    mbit = statistics.median(rates)
    latency = statistics.median(s - 8.0 * b / (mbit * 1e6) for b, s in zip(sizes, seconds, strict=True))
    return LinkModel(latency_s=max(0.0, latency), mbit=mbit, fitted="link rate", rows=len(sizes))


def fit(rows: list[dict], *, server_s: float = 0.0, workload: Mapping | None = None, fitted_from: Iterable[str] = ()) -> LatencyModel:
    """A latency model from measured client-rounds. Each row: device, network, steps, rank,
    prune, train_s, loop_s, wait_s, downlink_s, uplink_s, bytes_down, bytes_up,
    link_down_mbit, link_up_mbit (payload bytes; rates as configured, or None)."""
    if not rows:
        raise LatencyModelError("no measured client-round to fit: the runs need clients.csv rows with downlink, train and uplink times")
    steps = {r["steps"] for r in rows}
    by_device, by_network = defaultdict(list), defaultdict(list)
    for r in rows:
        by_device[r["device"]].append(r)
        by_network[r["network"]].append(r)
    down = {n: fit_link([r["bytes_down"] for r in rs], [r["downlink_s"] for r in rs], [r.get("link_down_mbit") for r in rs])
            for n, rs in by_network.items()}
    up = {n: fit_link([r["bytes_up"] for r in rs], [r["uplink_s"] for r in rs], [r.get("link_up_mbit") for r in rs])
          for n, rs in by_network.items()}
    devices = {}
    for d, rs in by_device.items():  # then each device: what its transfers took beyond its links' fit
        extra_down = statistics.median(r["downlink_s"] - down[r["network"]].transfer_s(r["bytes_down"]) for r in rs)
        extra_up = statistics.median(r["uplink_s"] - up[r["network"]].transfer_s(r["bytes_up"]) for r in rs)
        devices[d] = replace(fit_device(rs), downlink_extra_s=extra_down, uplink_extra_s=extra_up)
    model = LatencyModel(devices=devices, down=down, up=up, steps=max(steps), workload=dict(workload or {}), server_s=server_s,
                         fitted_from=list(fitted_from))
    return replace(model, error=errors(model, rows))


def predicted_and_measured(model: LatencyModel, row: dict) -> tuple[dict[str, float], dict[str, float]]:
    """The model's phases for a measured row's inputs, and the row's own (with e2e_s)."""
    predicted = model.phases(row["device"], row["network"], steps=row["steps"], rank=row["rank"], prune=row["prune"],
                             bytes_down=row["bytes_down"], bytes_up=row["bytes_up"], strategy=row.get("strategy", ""))
    measured = {k: row[k] for k in PHASES}
    measured["e2e_s"] = sum(measured.values())
    return predicted, measured


def errors(model: LatencyModel, rows: list[dict]) -> dict[str, float]:
    """Median absolute relative error of each phase and of e2e over ``rows``."""
    rel = defaultdict(list)
    for r in rows:
        p, measured = predicted_and_measured(model, r)
        for k, v in measured.items():
            if v > 0:
                rel[k].append(abs(p[k] - v) / v)
    return {k: round(statistics.median(v), 4) for k, v in rel.items()}


# --- reading runs ---------------------------------------------------------------------------------

WORKLOAD_KEYS = ("model.path", "model.task", "model.max-seq-len", "train.batch-size")


def _number(value: str) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def rows_of_run(run_dir: Path, clocks: tuple[str, ...] = ("measured",)) -> tuple[list[dict], dict, float | None]:
    """(client-round rows to fit on, the run's workload, the server's median part of a
    round) of one run directory. Rows: accepted client-rounds on one of ``clocks`` with
    every phase timed on the device (stamen-supernode's transport timing). Only measured
    rows are fitted; a comparison may read emulated ones."""
    run_dir = Path(run_dir)
    try:
        config = json.loads((run_dir / "stamen-config.json").read_text())
        clients = list(csv.DictReader(open(run_dir / "clients.csv")))
    except OSError as err:
        raise LatencyModelError(f"{run_dir}: not a run directory with clients.csv ({err})") from None
    steps = int(config["train.local-steps"])
    rows = []
    for c in clients:
        if c.get("status") not in ("ok", "clipped", "reweighted") or (c.get("clock") or "measured") not in clocks:
            continue
        values = {k: _number(c.get(k, "")) for k in (*PHASES, "loop_s", "payload_down_bytes", "payload_up_bytes", "lora_rank")}
        if any(v is None for v in values.values()):
            continue  # a phase not timed (simulation, a stock SuperNode) or a non-LoRA instruction
        rows.append({
            "run": run_dir.name, "round": int(c["round"]), "node_id": c["node_id"], "clock": c.get("clock") or "measured",
            "device": c.get("device") or c["device_class"], "device_class": c["device_class"], "network": c["network"],
            "steps": steps,
            "rank": values["lora_rank"], "prune": _number(c.get("prune_ratio", "")) or 0.0, "strategy": config.get("strategy.name", ""),
            **{k: values[k] for k in (*PHASES, "loop_s")},
            "bytes_down": values["payload_down_bytes"], "bytes_up": values["payload_up_bytes"],
            "link_down_mbit": _number(c.get("link_down_mbit", "")), "link_up_mbit": _number(c.get("link_up_mbit", "")),
        })
    server = None
    if (run_dir / "rounds.csv").is_file():
        slowest = defaultdict(float)
        for r in rows:
            slowest[r["round"]] = max(slowest[r["round"]], sum(r[k] for k in PHASES))
        parts = [float(r["round_s"]) - slowest[int(r["round"])] for r in csv.DictReader(open(run_dir / "rounds.csv"))
                 if int(r["round"]) in slowest]
        server = statistics.median(parts) if parts else None
    return rows, {k: config.get(k) for k in WORKLOAD_KEYS}, server


def calibrate(run_dirs: Iterable[Path]) -> tuple[LatencyModel, list[dict]]:
    """A latency model from run directories (they must train the same workload), and the rows it was fitted on."""
    rows, workloads, servers, names = [], {}, [], []
    for run_dir in run_dirs:
        r, workload, server = rows_of_run(run_dir)
        rows += r
        workloads[str(run_dir)] = workload
        names.append(str(run_dir))
        if server is not None:
            servers.append(server)
    distinct = {json.dumps(w, sort_keys=True) for w in workloads.values()}
    if len(distinct) > 1:
        raise LatencyModelError(f"the runs train different workloads ({'; '.join(sorted(distinct))}): calibrate one workload per model file")
    workload = next(iter(workloads.values()), {})
    return fit(rows, server_s=statistics.median(servers) if servers else 0.0, workload=workload, fitted_from=names), rows
