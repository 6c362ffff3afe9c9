"""The ServerApp. Its main reads top to bottom as the run happens."""

from __future__ import annotations

from logging import ERROR, INFO

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from measurements.session import MeasurementSession
from ml.model import adapted_weights, head_state, target_module_names
from ml.tasks import build_task, pick_device
from stamen.config import ConfigError, StamenConfig
from strategies import STRATEGIES
from strategies.lora_records import from_record, join_global, to_record

from .evaluation import ServerEvaluation
from .grid import PolledGrid
from .privacy import write_privacy
from .profiles import query_profiles, ranks_from_profiles
from .run_dir import RunDirectory

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        cfg = StamenConfig.from_run_config(context.run_config)
        task, split = build_task(cfg)  # checks model.path and data before anything trains
        if cfg.is_early_exit:
            from . import early_exit

            model, targets = early_exit.build_model(cfg, task), []
        else:
            torch.manual_seed(cfg.train.seed)  # the head's initial weights, sent to every node
            model = task.load_model().to(pick_device())
            targets = target_module_names(model, cfg.lora.target_modules)
    except ConfigError as err:
        log(ERROR, "configuration error: %s", err)
        raise
    columns = {"metrics_columns": early_exit.metrics_columns(cfg, model)} if cfg.is_early_exit else {}
    run = RunDirectory.create(cfg.output.dir, context.run_id, cfg.as_flat_dict(), **columns)
    log(INFO, "run directory: %s", run.path)
    grid = PolledGrid(grid, cfg.strategy.poll_interval)
    with MeasurementSession(
        run, run_id=context.run_id, collector=cfg.measure.collector, enabled=cfg.measure.enabled
    ) as measurements:
        if cfg.is_early_exit:
            early_exit.run(grid, cfg, task, split, model, run, measurements)
        else:
            _run(grid, cfg, task, split, model, targets, run, measurements)
    log(INFO, "run directory: %s", run.path)


def _run(grid: Grid, cfg: StamenConfig, task, split, model, targets, run: RunDirectory, measurements: MeasurementSession) -> None:
    profiles = query_profiles(grid, min_nodes=cfg.strategy.min_nodes, timeout=cfg.strategy.query_timeout, on_replies=measurements.take_replies)
    measurements.profiles = profiles
    run.write_json("profiles.json", {str(n): p for n, p in profiles.items()})
    node_ranks = ranks_from_profiles(profiles, cfg.lora)
    for node, rank in sorted(node_ranks.items()):
        log(INFO, "node %d: %s, LoRA rank %d", node, profiles[node].get("device-class"), rank)

    try:
        algorithm = STRATEGIES[cfg.strategy.name].from_config(
            cfg,
            node_ranks=node_ranks,
            default_rank=cfg.lora.rank,
            lora_alpha=cfg.lora.alpha,
            fraction_train=cfg.strategy.fraction_train,
            min_nodes=cfg.strategy.min_nodes,
            message_ttl=cfg.strategy.round_timeout,
            seed=cfg.train.seed,
        )
    except ValueError as err:  # e.g. fedit with mixed ranks
        log(ERROR, "strategy %s: %s", cfg.strategy.name, err)
        raise
    if cfg.dp.central:  # the server clips every node's update and noises the aggregate
        from strategies.central_dp import CentralDP

        algorithm = CentralDP(
            algorithm, noise_multiplier=cfg.dp.noise_multiplier, clipping_norm=cfg.dp.clipping_norm, delta=cfg.dp.delta
        )
    strategy = measurements.wrap(algorithm)  # -> rounds.csv, clients.csv, resources.csv
    algorithm.attach_run(run, measurements.round_times)
    initial = join_global(adapted_weights(model, targets), head_state(model))
    evaluate = ServerEvaluation(cfg, task, model, split.test, run, algorithm)
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
