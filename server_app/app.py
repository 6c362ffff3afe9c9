"""The ServerApp. Its main reads top to bottom as the run happens."""

from __future__ import annotations

import shutil
from logging import ERROR, INFO, WARNING

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from measurements.clock import ClockedStrategy
from measurements.session import MeasurementSession
from ml.tasks import build_task
from stamen import keys
from stamen.config import ConfigError, StamenConfig
from strategies.lora_records import from_record, to_record

from . import checkpoint
from .early_exit import EarlyExitFamily
from .family import Family, LoRAFamily
from .fleet import host_wait, simulated_clock
from .grid import PolledGrid
from .privacy import write_privacy
from .profiles import check_partitions, leave_out, query_profiles
from .quorum import Quorum
from .resume import RoundOffset, RunCheckpoints, check_config
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
    run, saved = open_run(cfg, context, family)
    log(INFO, "run directory: %s", run.path)
    grid = PolledGrid(grid, cfg.strategy.poll_interval)
    with MeasurementSession(
        run, run_id=context.run_id, collector=cfg.measure.collector, enabled=cfg.measure.enabled,
        certfile=cfg.measure.collector_certfile, keyfile=cfg.measure.collector_keyfile
    ) as measurements:
        _run(measurements.grid(grid), cfg, split, family, run, measurements, saved)
    log(INFO, "run directory: %s", run.path)


def open_run(cfg: StamenConfig, context: Context, family: Family) -> tuple[RunDirectory, checkpoint.Checkpoint | None]:
    """A new run directory, or with ``checkpoint.resume-from`` the one of the run to
    continue, cut back to its last complete checkpoint (server_app/resume.py)."""
    if not cfg.checkpoint.resume_from:
        columns = {"metrics_columns": family.metrics_columns} if family.metrics_columns else {}
        return RunDirectory.create(cfg.output.dir, context.run_id, cfg.as_flat_dict(), run_config=dict(context.run_config), **columns), None
    try:
        run = RunDirectory.open(cfg.checkpoint.resume_from)
        saved = checkpoint.latest(run.path)
        check_config(saved.state["config"], cfg.as_flat_dict())
    except (ConfigError, checkpoint.CheckpointError) as err:
        log(ERROR, "cannot resume: %s", err)
        raise
    if saved.server_round >= cfg.strategy.num_rounds:
        raise ConfigError(
            f"checkpoint.resume-from: {run.path} finished its {saved.server_round} rounds; raise strategy.num-rounds to train on, "
            f"or write its model with `stamen export {run.path}`"
        )
    run.cut_tables(saved.server_round)
    run.note_resume(context.run_id, saved.server_round)
    log(INFO, "resuming run %s after round %d of %d (%s)", run.path.name, saved.server_round, cfg.strategy.num_rounds, saved.path)
    return run, saved


def write_profiles(run: RunDirectory, profiles: dict, failed: dict, algorithm) -> None:
    """profiles.json: every node's profile, and why a node was left out."""
    out = {**{str(n): dict(p) for n, p in profiles.items()}, **{str(n): {} for n in failed}}
    for node, reason in algorithm.retired.items():
        out.setdefault(str(node), {})["left-out"] = reason
    run.write_json("profiles.json", out)


def _run(grid: Grid, cfg: StamenConfig, split, family: Family, run: RunDirectory, measurements: MeasurementSession, saved) -> None:
    profiles, failed = query_profiles(grid, min_nodes=cfg.strategy.min_nodes, timeout=cfg.strategy.query_timeout, on_replies=measurements.take_replies)
    check_partitions(cfg, split, profiles)  # one clear error, not one in every ClientApp
    measurements.profiles = profiles
    clock = simulated_clock(cfg, profiles)  # a simulated fleet's clock, or None (measurements/clock.py)
    measurements.clock = clock
    algorithm = family.strategy(profiles)  # a node whose config gives no valid rank or depth is left out
    wait = cfg.strategy.round_timeout  # how long the host waits for a round's replies (and the messages' TTL)
    if clock is not None:  # the deadline is the simulated clock's: the host's own wait must not cut a round short
        algorithm.message_ttl = wait = host_wait(cfg)
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
    timed = measurements.wrap(algorithm)  # -> rounds.csv, clients.csv, resources.csv
    algorithm.attach_run(run, measurements.round_times)
    initial = family.initial()
    evaluate = family.evaluation(split.test, run, algorithm)
    evaluate.clock = clock
    label_names = split.test.class_names
    checkpoints = RunCheckpoints(run, keep=cfg.checkpoint.keep, config=cfg.as_flat_dict(), strategy=algorithm,
                                 measurements=measurements, evaluation=evaluate, profiles=profiles, clock=clock)
    if saved is not None:  # continue a killed run (server_app/resume.py)
        checkpoints.restore(saved, profiles)
        initial = saved.global_arrays
    done = saved.server_round if saved is not None else 0
    # a round too few nodes served stops the run (server_app/quorum.py); on a simulated
    # clock, a reply after the deadline counts as none (measurements/clock.py)
    served = Quorum(timed, min_replies=cfg.strategy.min_replies)
    if clock is not None:  # (a late reply's telemetry is still the node's measurement: clients.csv keeps it)
        served = ClockedStrategy(served, clock, on_hidden=measurements.take_replies)
    strategy = RoundOffset(served, offset=done)
    after_round = checkpoints.after(evaluate)
    if cfg.checkpoint.export_every_round:
        after_round = export_after(after_round, family, run, checkpoints, label_names)
    result = strategy.start(
        grid,
        to_record(initial),
        num_rounds=cfg.strategy.num_rounds - done,
        timeout=wait,
        # local DP: every node continues its privacy ledger of the run directory's first run
        train_config=ConfigRecord({keys.LEDGER_RUN: run.path.name}),
        evaluate_fn=strategy.evaluation(after_round),
    )
    final = from_record(result.arrays) if len(result.arrays) else initial
    run.save_arrays("global_model.npz", final)
    write_exports(family, run, final, checkpoints, label_names)
    write_privacy(run, algorithm)
    measurements.finish(grid, sorted(profiles), timeout=cfg.strategy.query_timeout)
    algorithm.finish()  # after the last uplinks are in: e.g. the bandits' last rewards
    log(INFO, "done: %s", evaluate.summary())


def write_exports(family: Family, run: RunDirectory, final: dict, checkpoints: RunCheckpoints, label_names) -> None:
    """final/ and best/: the last round's model and the best round's, as Hugging Face
    directories (ml/export.py). The best round's arrays come from its checkpoint, which
    pruning keeps; round 0 (no training helped) has none, and best/ is not written. When
    the last round is the best, best/ is a link to final/."""
    for path in family.export(final, checkpoints.adapter(), run.path / "final", label_names=label_names):
        log(INFO, "final model: %s", path)
    best = checkpoints.best_round
    target = run.path / "best"
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.is_dir():  # a run resumed to train on: its earlier best/
        shutil.rmtree(target)
    if best and best == max(checkpoint.rounds(run.path), default=None):  # the last round is the best: one copy
        target.symlink_to("final", target_is_directory=True)
        log(INFO, "best model (round %d): %s -> final", best, target)
    elif best:
        saved = checkpoint.latest(run.path, best)
        for path in family.export(saved.global_arrays, saved.adapter, run.path / "best", label_names=label_names):
            log(INFO, "best model (round %d): %s", best, path)
    else:
        log(WARNING, "best model: the model before training scored best; no best/ directory")


def export_after(evaluate, family: Family, run: RunDirectory, checkpoints: RunCheckpoints, label_names):
    """``checkpoint.export-every-round``: rounds/<N>/ after every round's checkpoint."""

    def evaluate_and_export(server_round: int, arrays):
        metrics = evaluate(server_round, arrays)
        if server_round > 0:
            family.export(from_record(arrays), checkpoints.adapter(), run.path / "rounds" / str(server_round), label_names=label_names)
        return metrics

    return evaluate_and_export
