"""``stamen export``: a round of a finished or killed run as a Hugging Face directory.

The run's own run-config.toml says which model and task; the round's checkpoint
(server_app/checkpoint.py) holds the global weights and, for FedIT, HetLoRA and FlexLoRA,
the global adapter. ml/export.py writes the directories.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from stamen.config import ConfigError, StamenConfig

from . import checkpoint
from .run_dir import RUN_CONFIG_FILE

FORMATS = ("merged", "adapter")


class ExportError(RuntimeError):
    """What cannot be exported, and what to do instead."""


def export_run(run_dir: Path, *, server_round: int | None, fmt: str, out: Path) -> list[Path]:
    """The layout of a run's final/ and best/: ``merged`` writes ``out/model`` (the
    early-exit strategies: ``out/early-exit``), ``adapter`` writes ``out/adapter`` (and
    ``out/base`` for a classifier). Returns the directories written."""
    from ml.export import export_adapter, export_merged
    from ml.tasks import build_task

    from .early_exit import EarlyExitFamily

    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: one of {', '.join(FORMATS)}")
    run_dir = Path(run_dir).resolve()
    if not (run_dir / RUN_CONFIG_FILE).is_file():
        raise ExportError(f"{run_dir}: no {RUN_CONFIG_FILE}; not a run directory of this version of Stamen")
    try:
        cfg = StamenConfig.from_run_config(tomllib.loads((run_dir / RUN_CONFIG_FILE).read_text()))
        saved = checkpoint.latest(run_dir, server_round)
        task, split = build_task(cfg)
    except (ConfigError, checkpoint.CheckpointError) as err:
        raise ExportError(str(err)) from err
    labels = split.test.class_names
    print(f"[stamen] exporting round {saved.server_round} of {run_dir.name} ({cfg.strategy.name}) as {fmt}", flush=True)
    if cfg.is_early_exit:
        if fmt == "adapter":
            raise ExportError(f"{cfg.strategy.name} trains whole exit modules, not an adapter: use --format merged")
        return EarlyExitFamily(cfg, task).export(saved.global_arrays, {}, Path(out), label_names=labels)
    if fmt == "merged":
        return [export_merged(task, saved.global_arrays, Path(out) / "model", label_names=labels)]
    if not saved.adapter:
        raise ExportError(f"{cfg.strategy.name} merges every round into the weights and keeps no adapter: use --format merged")
    return [export_adapter(task, saved.global_arrays, saved.adapter, Path(out), label_names=labels)]
