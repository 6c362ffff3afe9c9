"""``runs/<run-id>/``: everything a run leaves behind.

config.json (resolved configuration), versions.json (packages, Python, git commit),
profiles.json (device profiles of the nodes), metrics.csv (one row per round), and
global_model.npz (the final adapted weights and head). Phase timings (issue 3) are
written beside these by the instrumentation layer.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

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

    @classmethod
    def create(cls, root: str, run_id: int | str, config: dict[str, Any]) -> RunDirectory:
        path = Path(root).expanduser().resolve() / str(run_id)
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path)
        run.write_json("config.json", config)
        versions = {"python": sys.version.split()[0], "platform": platform.platform(), "git-commit": git_commit()}
        for name in _PACKAGES:
            try:
                versions[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                versions[name] = None
        run.write_json("versions.json", versions)
        with open(run.metrics_csv, "w", newline="") as f:
            csv.writer(f).writerow(METRICS_COLUMNS)
        return run

    def write_json(self, name: str, data: Any) -> None:
        (self.path / name).write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")

    def append_metrics(self, row: dict[str, Any]) -> None:
        unknown = set(row) - set(METRICS_COLUMNS)
        if unknown:
            raise KeyError(f"metrics.csv has no columns {sorted(unknown)}")
        with open(self.metrics_csv, "a", newline="") as f:
            csv.writer(f).writerow([_fmt(row.get(c, "")) for c in METRICS_COLUMNS])

    def save_arrays(self, name: str, arrays: dict[str, np.ndarray]) -> Path:
        target = self.path / name
        np.savez(target, **arrays)
        return target


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    return value
