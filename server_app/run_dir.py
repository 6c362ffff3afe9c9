"""``runs/<run-id>/``: everything a run leaves behind.

stamen-config.json (resolved configuration; not ``config.json``, the name of a Hugging
Face model's config, so that no one mistakes a run directory for a model),
run-config.toml (the run config as Flower passed it: ``flwr run --run-config`` takes it
again, e.g. to resume), versions.json (packages, Python, git commit),
profiles.json (device profiles of the nodes), metrics.csv (one row per round: model
quality), rounds.csv (one row per round: server-side phase timings), clients.csv (one
row per round x node: every phase), resources.csv (resource samples over time), and
global_model.npz (the final adapted weights and head), checkpoints/ (per round,
server_app/checkpoint.py), final/ and best/ (Hugging Face directories, server_app/export.py),
resumes.json (the Flower runs that continued this one). Schemas: docs/measurements.md;
checkpoints and exports: docs/checkpoints.md.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

CONFIG_FILE = "stamen-config.json"
RUN_CONFIG_FILE = "run-config.toml"
METRICS_COLUMNS = (
    "round",
    "eval_loss",
    "eval_accuracy",
    "eval_perplexity",
    "train_loss",
    "num_clients",
    "global_rank",
    "dropped",
    "downlink_bytes",
    "elapsed_s",
)
# Server-side phase timings per round (measurements/aggregation.py); the server clock.
ROUNDS_COLUMNS = (
    "round",
    "started_unix_s",
    "configure_s",
    "aggregation_s",
    "round_s",
    "nodes_sent",
    "participants",
    "nodes_replied",
    "nodes_error",
    "nodes_late",
    "nodes_rejected",  # replied, and the strategy refused the update (the reason is in clients.csv)
    "nodes_clipped",  # accepted with its update scaled down to the round's bound
    "payload_down_bytes",
    "clock",  # measured | simulated (round_s from a latency model: docs/scale.md)
)
_PACKAGES = ("flwr", "torch", "transformers", "peft", "numpy", "flwr-datasets", "datasets", "grpcio", "protobuf", "psutil")


def git_commit() -> str:
    if os.environ.get("STAMEN_GIT_COMMIT"):
        return os.environ["STAMEN_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class RunDirectory:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.metrics_csv = path / "metrics.csv"
        self.rounds_csv = path / "rounds.csv"

    @classmethod
    def create(
        cls, root: str, run_id: int | str, config: dict[str, Any], *, metrics_columns: tuple[str, ...] = METRICS_COLUMNS,
        run_config: dict[str, Any] | None = None,
    ) -> RunDirectory:
        """``metrics_columns``: the header of metrics.csv (the early-exit strategies add a
        column per exit and threshold, see server_app/early_exit.py); ``run_config``:
        Flower's run config, for run-config.toml."""
        path = Path(root).expanduser().resolve() / str(run_id)
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path)
        run.write_json(CONFIG_FILE, config)
        if run_config is not None:
            (path / RUN_CONFIG_FILE).write_text(toml_table(run_config))
        versions = {"python": sys.version.split()[0], "platform": platform.platform(), "git-commit": git_commit()}
        for name in _PACKAGES:
            try:
                versions[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                versions[name] = None
        run.write_json("versions.json", versions)
        for table, columns in ((run.metrics_csv, metrics_columns), (run.rounds_csv, ROUNDS_COLUMNS)):
            with open(table, "w", newline="") as f:
                csv.writer(f).writerow(columns)
        return run

    @classmethod
    def open(cls, path: str | Path) -> RunDirectory:
        """An existing run directory, to continue (a resumed run); ConfigError if it is not one."""
        from stamen.config import ConfigError

        run = cls(Path(path).expanduser().resolve())
        if not (run.path / CONFIG_FILE).is_file():
            raise ConfigError(f"checkpoint.resume-from = {str(path)!r}: not a run directory (no {CONFIG_FILE} in {run.path})")
        return run

    def config(self) -> dict[str, Any]:
        return json.loads((self.path / CONFIG_FILE).read_text())

    def cut_tables(self, last_round: int) -> None:
        """metrics.csv and rounds.csv without the rows after ``last_round`` (a resumed run
        repeats the round the crash interrupted)."""
        for table in (self.metrics_csv, self.rounds_csv):
            with open(table, newline="") as f:
                rows = list(csv.reader(f))
            kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= last_round]
            tmp = table.with_suffix(".tmp")
            with open(tmp, "w", newline="") as f:
                csv.writer(f).writerows(kept)
            tmp.replace(table)

    def note_resume(self, run_id: int | str, from_round: int) -> None:
        """resumes.json: one entry per Flower run that continued this directory."""
        target = self.path / "resumes.json"
        entries = json.loads(target.read_text()) if target.is_file() else []
        entries.append({"flower-run-id": str(run_id), "after-round": from_round, "unix-s": round(time.time(), 3)})
        self.write_json("resumes.json", entries)

    def write_json(self, name: str, data: Any) -> None:
        (self.path / name).write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")

    def append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.metrics_csv, newline="") as f:
            columns = tuple(next(csv.reader(f)))  # the header this run was created with
        _append(self.metrics_csv, columns, row)

    def append_round_timing(self, timing) -> None:
        """One rounds.csv row from a measurements.aggregation.RoundTiming."""
        _append(
            self.rounds_csv,
            ROUNDS_COLUMNS,
            {
                "round": timing.server_round,
                "started_unix_s": f"{timing.started_at:.3f}",
                "configure_s": timing.configure_s,
                "aggregation_s": timing.aggregation_s,
                "round_s": timing.round_s,
                "clock": timing.clock,
                "nodes_sent": len(timing.sent),
                "participants": len(timing.accepted),
                "nodes_replied": len(timing.replied),
                "nodes_error": len(timing.errors),
                "nodes_late": len(timing.late),
                "nodes_rejected": len(timing.rejected),
                "nodes_clipped": len(timing.outcome_of("clipped")),
                "payload_down_bytes": timing.payload_down_bytes,
            },
        )

    def write_table(self, name: str, columns: tuple[str, ...], rows: list[dict[str, Any]]) -> Path:
        """(Re)write a whole CSV: tables whose rows fill in late (an uplink is measured
        after its reply has been aggregated) are rewritten as figures arrive."""
        target = self.path / name
        tmp = target.with_suffix(".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            writer.writerows(_cells(name, columns, row) for row in rows)
        tmp.replace(target)
        return target

    def save_arrays(self, name: str, arrays: dict[str, np.ndarray]) -> Path:
        target = self.path / name
        np.savez(target, **arrays)
        return target


def toml_table(flat: dict[str, Any]) -> str:
    """A flat {"section.key": scalar} mapping as TOML with quoted keys, as pyproject's
    [tool.flwr.app.config] writes it."""
    lines = ["# the run config of this run, as Flower passed it to the ServerApp; `flwr run --run-config` takes this file"]
    for key, value in sorted(flat.items()):
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value) if math.isfinite(value) else ("nan" if math.isnan(value) else ("inf" if value > 0 else "-inf"))
        else:
            text = json.dumps(str(value))
        lines.append(f"{json.dumps(key)} = {text}")
    return "\n".join(lines) + "\n"


def _append(path: Path, columns: tuple[str, ...], row: dict[str, Any]) -> None:
    cells = _cells(path.name, columns, row)
    with open(path, "a", newline="") as f:
        csv.writer(f).writerow(cells)


def _cells(table: str, columns: tuple[str, ...], row: dict[str, Any]) -> list[Any]:
    """A row in column order; a key the table has no column for is a bug, not a silent drop."""
    unknown = set(row) - set(columns)
    if unknown:
        raise KeyError(f"{table} has no columns {sorted(unknown)}")
    return [_fmt(row.get(c)) for c in columns]


def _fmt(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return int(value)  # byte counts and the like
        if abs(value) >= 1e5:
            return f"{value:.3f}"  # unix times: keep the milliseconds
        return f"{value:.6g}"
    return value
