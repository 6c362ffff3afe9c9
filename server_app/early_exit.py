"""The ServerApp's path for the early-exit strategies (ReeFL and its baselines): depths
from the device profiles, the model's trainable state as the global state, and an
evaluation of every exit after every round."""

from __future__ import annotations

from logging import INFO

import torch
from flwr.app import ArrayRecord
from flwr.serverapp import Grid
from flwr.supercore import log

from measurements.session import MeasurementSession
from ml import early_exit
from stamen.config import StamenConfig
from strategies import STRATEGIES
from strategies.lora_records import from_record, to_record

from .evaluation import ServerEvaluation
from .privacy import write_privacy
from .profiles import exits_from_profiles, query_profiles
from .run_dir import RunDirectory


def build_model(cfg: StamenConfig, task) -> early_exit.EarlyExitClassifier:
    """The full-depth model with the exit module the strategy asks for."""
    from ml.tasks import pick_device

    return early_exit.model_from_config(task, cfg, exit_kind=STRATEGIES[cfg.strategy.name].exit_kind).to(pick_device())


def metrics_columns(cfg: StamenConfig, model) -> tuple[str, ...]:
    """metrics.csv's header for this model: see :class:`ExitEvaluation`."""
    exits = tuple(f"eval_accuracy_exit{j}" for j in range(1, len(model.exit_blocks) + 1))
    thresholds = tuple(c for t in cfg.early_exit.thresholds for c in (f"eval_accuracy_at_{t:g}", f"eval_blocks_at_{t:g}"))
    return (
        ("round", "eval_accuracy") + exits + ("eval_accuracy_mean", "eval_accuracy_ensemble") + thresholds
        + ("train_loss", "num_clients", "skipped", "dropped", "downlink_bytes", "elapsed_s")
    )


def run(grid: Grid, cfg: StamenConfig, task, split, model, run_dir: RunDirectory, measurements: MeasurementSession) -> None:
    profiles = query_profiles(grid, min_nodes=cfg.strategy.min_nodes, timeout=cfg.strategy.query_timeout, on_replies=measurements.take_replies)
    measurements.profiles = profiles
    run_dir.write_json("profiles.json", {str(n): p for n, p in profiles.items()})
    num_exits = len(model.exit_blocks)
    node_exits = exits_from_profiles(profiles, cfg.early_exit, num_exits)
    for node, e in sorted(node_exits.items()):
        log(INFO, "node %d: %s, max exit %d (%d of %d blocks)", node, profiles[node].get("device-class"), e, model.exit_blocks[e - 1], model.num_blocks)
    algorithm = STRATEGIES[cfg.strategy.name].from_config(
        cfg,
        node_exits=node_exits,
        num_exits=num_exits,
        required_exits=model.required_exits(),
        fraction_train=cfg.strategy.fraction_train,
        min_nodes=cfg.strategy.min_nodes,
        message_ttl=cfg.strategy.round_timeout,
    )
    strategy = measurements.wrap(algorithm)  # -> rounds.csv, clients.csv, resources.csv
    initial = model.trainable_state()
    evaluate = ExitEvaluation(cfg, task, model, split.test, run_dir, algorithm)
    result = strategy.start(
        grid, to_record(initial), num_rounds=cfg.strategy.num_rounds, timeout=cfg.strategy.round_timeout, evaluate_fn=evaluate
    )
    run_dir.save_arrays("global_model.npz", from_record(result.arrays) if len(result.arrays) else initial)
    write_privacy(run_dir, algorithm)
    measurements.finish(grid, sorted(profiles), timeout=cfg.strategy.query_timeout)
    log(INFO, "done: %s", evaluate.summary())


class ExitEvaluation(ServerEvaluation):
    """Evaluates every exit of the global model on the held-out split after every round
    (round 0 first) and writes the round's row of metrics.csv: ``eval_accuracy_exit<j>``,
    ``eval_accuracy_mean`` (over exits), ``eval_accuracy_ensemble``, and per confidence
    threshold t ``eval_accuracy_at_<t>`` with ``eval_blocks_at_<t>`` (share of blocks run).
    ``eval_accuracy`` is the deepest exit's (the full model's) accuracy."""

    def measure(self, arrays: ArrayRecord) -> dict[str, float]:
        self.model.load_trainable_state(from_record(arrays))
        with torch.inference_mode():
            metrics = early_exit.evaluate(
                self.model, self.task, self.test, batch_size=self.cfg.eval.batch_size, thresholds=self.cfg.early_exit.thresholds
            )
        metrics["accuracy"] = metrics[f"accuracy_exit{len(self.model.exit_blocks)}"]
        return metrics

    def round_fields(self, rec) -> dict:
        return {"skipped": len(rec.skipped)}

    def metrics_text(self, metrics: dict[str, float]) -> str:
        exits = " ".join(f"{metrics[f'accuracy_exit{j}']:.3f}" for j in range(1, len(self.model.exit_blocks) + 1))
        return f"exits {exits} | mean {metrics['accuracy_mean']:.4f}, ensemble {metrics['accuracy_ensemble']:.4f}"

    def round_text(self, row: dict) -> str:
        return f"clients {row.get('num_clients', '-')}, skipped {row.get('skipped', '-')}, dropped {row.get('dropped', '-')}"

    def summary_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        return {k: v for k, v in metrics.items() if not k.startswith(("accuracy_at", "blocks_at"))}
