"""The ServerApp. Its main reads top to bottom as the run happens."""

from __future__ import annotations

from logging import ERROR, INFO

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from measurements.session import MeasurementSession
from ml.tasks import build_task
from stamen.config import ConfigError, StamenConfig
from strategies.lora_records import from_record, to_record

from .early_exit import EarlyExitFamily
from .family import Family, LoRAFamily
from .grid import PolledGrid
from .privacy import write_privacy
from .profiles import leave_out, query_profiles
from .run_dir import RunDirectory

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        cfg = StamenConfig.from_run_config(context.run_config)
        task, split = build_task(cfg)  # checks model.path and data before anything trains
        family = (EarlyExitFamily if cfg.is_early_exit else LoRAFamily)(cfg, task)  # what differs: server_app/family.py
    except ConfigError as err:
        log(ERROR, "configuration error: %s", err)
        raise
    columns = {"metrics_columns": family.metrics_columns} if family.metrics_columns else {}
    run = RunDirectory.create(cfg.output.dir, context.run_id, cfg.as_flat_dict(), **columns)
    log(INFO, "run directory: %s", run.path)
    grid = PolledGrid(grid, cfg.strategy.poll_interval)
    with MeasurementSession(
        run, run_id=context.run_id, collector=cfg.measure.collector, enabled=cfg.measure.enabled,
        certfile=cfg.measure.collector_certfile, keyfile=cfg.measure.collector_keyfile
    ) as measurements:
        _run(measurements.grid(grid), cfg, split, family, run, measurements)
    log(INFO, "run directory: %s", run.path)


def write_profiles(run: RunDirectory, profiles: dict, failed: dict, algorithm) -> None:
    """profiles.json: every node's profile, and why a node was left out."""
    out = {**{str(n): dict(p) for n, p in profiles.items()}, **{str(n): {} for n in failed}}
    for node, reason in algorithm.retired.items():
        out.setdefault(str(node), {})["left-out"] = reason
    run.write_json("profiles.json", out)


def _run(grid: Grid, cfg: StamenConfig, split, family: Family, run: RunDirectory, measurements: MeasurementSession) -> None:
    profiles, failed = query_profiles(grid, min_nodes=cfg.strategy.min_nodes, timeout=cfg.strategy.query_timeout, on_replies=measurements.take_replies)
    measurements.profiles = profiles
    algorithm = family.strategy(profiles)  # a node whose config gives no valid rank or depth is left out
    leave_out(algorithm, failed)
    write_profiles(run, profiles, failed, algorithm)

    def admit(grid: Grid, nodes: list[int]) -> None:  # a node that connected mid-run: profiled like the others
        new, new_failed = query_profiles(grid, min_nodes=0, timeout=cfg.strategy.query_timeout, on_replies=measurements.take_replies, nodes=nodes)
        profiles.update(new)
        failed.update(new_failed)
        family.admit(algorithm, new)
        leave_out(algorithm, new_failed)
        algorithm.declare_profiles(new)
        write_profiles(run, profiles, failed, algorithm)

    algorithm.admit_new_nodes(admit, known=set(profiles) | set(failed))
    algorithm.declare_profiles(profiles)  # each node's num-examples: the cap of its weight (strategies/bounds.py)
    strategy = measurements.wrap(algorithm)  # -> rounds.csv, clients.csv, resources.csv
    algorithm.attach_run(run, measurements.round_times)
    initial = family.initial()
    evaluate = family.evaluation(split.test, run, algorithm)
    result = strategy.start(
        grid,
        to_record(initial),
        num_rounds=cfg.strategy.num_rounds,
        timeout=cfg.strategy.round_timeout,
        evaluate_fn=evaluate,
    )
    run.save_arrays("global_model.npz", from_record(result.arrays) if len(result.arrays) else initial)
    write_privacy(run, algorithm)
    measurements.finish(grid, sorted(profiles), timeout=cfg.strategy.query_timeout)
    algorithm.finish()  # after the last uplinks are in: e.g. the bandits' last rewards
    log(INFO, "done: %s", evaluate.summary())
