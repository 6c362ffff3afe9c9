"""The early-exit family of the ServerApp (ReeFL and its baselines): depths from the
device profiles, the model's trainable state as the global state, and an evaluation of
every exit after every round (server_app/family.py says what a family is)."""

from __future__ import annotations

from logging import INFO
from pathlib import Path

import torch
from flwr.app import ArrayRecord
from flwr.supercore import log

from ml import early_exit
from stamen.config import StamenConfig
from strategies import STRATEGIES
from strategies.lora_records import from_record

from .evaluation import ServerEvaluation
from .family import Family
from .profiles import exits_from_profiles, leave_out


class EarlyExitFamily(Family):
    """Depth-heterogeneous early exits: depths from the profiles; the model's trainable
    state is the global state; every exit is evaluated after every round."""

    def __init__(self, cfg: StamenConfig, task) -> None:
        from ml.tasks import pick_device

        super().__init__(cfg, task)
        self.model = early_exit.model_from_config(task, cfg, exit_kind=STRATEGIES[cfg.strategy.name].exit_kind).to(pick_device())
        self.metrics_columns = metrics_columns(cfg, self.model)

    def strategy(self, profiles):
        cfg, model = self.cfg, self.model
        num_exits = len(model.exit_blocks)
        node_exits, left_out = exits_from_profiles(profiles, cfg.early_exit, num_exits)
        for node, e in sorted(node_exits.items()):
            log(INFO, "node %d: %s, max exit %d (%d of %d blocks)", node, profiles[node].get("device-class"), e, model.exit_blocks[e - 1], model.num_blocks)
        algorithm = STRATEGIES[cfg.strategy.name].from_config(
            cfg, node_exits=node_exits, num_exits=num_exits, required_exits=model.required_exits(), **self.common()
        )
        leave_out(algorithm, left_out)
        return algorithm

    def admit(self, algorithm, profiles):
        exits, left_out = exits_from_profiles(profiles, self.cfg.early_exit, len(self.model.exit_blocks))
        for node, e in sorted(exits.items()):
            log(INFO, "node %d joined: %s, max exit %d", node, profiles[node].get("device-class"), e)
        algorithm.node_exits.update(exits)
        leave_out(algorithm, left_out)

    def initial(self):
        return self.model.trainable_state()

    def evaluation(self, test, run, algorithm):
        return ExitEvaluation(self.cfg, self.task, self.model, test, run, algorithm)

    def export(self, global_arrays, adapter, out, *, label_names):
        """``early-exit/``: the model's weights and early-exit.json (ml/export.py: load_early_exit)."""
        from ml.export import export_early_exit

        cfg, ee = self.cfg, self.cfg.early_exit
        self.model.load_trainable_state(global_arrays)
        structure = {
            "task": cfg.model.task, "model_path": self.task.model_path, "max_seq_len": cfg.model.max_seq_len,
            "exit_kind": self.model.exit_kind, "exit_blocks": list(self.model.exit_blocks), "tuning": ee.tuning,
            "lora_rank": cfg.lora.rank, "lora_alpha": cfg.lora.alpha, "ree_heads": ee.ree_heads,
            "ree_attn_dim": ee.ree_attn_dim, "ree_mlp_ratio": ee.ree_mlp_ratio, "seed": cfg.train.seed,
        }
        return [export_early_exit(self.model, Path(out) / "early-exit", structure=structure, label_names=label_names,
                                  thresholds=ee.thresholds)]


def metrics_columns(cfg: StamenConfig, model) -> tuple[str, ...]:
    """metrics.csv's header for this model: see :class:`ExitEvaluation`."""
    exits = tuple(f"eval_accuracy_exit{j}" for j in range(1, len(model.exit_blocks) + 1))
    thresholds = tuple(c for t in cfg.early_exit.thresholds for c in (f"eval_accuracy_at_{t:g}", f"eval_blocks_at_{t:g}"))
    return (
        ("round", "eval_accuracy") + exits + ("eval_accuracy_mean", "eval_accuracy_ensemble") + thresholds
        + ("train_loss", "num_clients", "skipped", "dropped", "downlink_bytes", "elapsed_s")
    )


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
