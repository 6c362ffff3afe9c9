"""Server-side evaluation after every round: the held-out split, one row of metrics.csv,
one log line. :class:`ServerEvaluation` serves the LoRA strategies; a family with other
figures overrides its hooks (server_app/early_exit.py: ExitEvaluation)."""

from __future__ import annotations

import time
from logging import INFO

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.supercore import log

from ml.model import load_adapted_weights, load_head_state
from stamen.config import StamenConfig
from strategies.lora_records import from_record, split_global

from .run_dir import RunDirectory


def evaluated_split(cfg: StamenConfig, test):
    """The examples of the held-out split the server evaluates on: ``eval.max-examples``
    of them (all for 0), drawn with ``data.seed``, in their split's order."""
    n = cfg.eval.max_examples or len(test)
    return test.subset(np.sort(np.random.default_rng(cfg.data.seed).permutation(len(test))[: min(n, len(test))]))


class ServerEvaluation:
    """Evaluates the global model on the held-out split after every round and writes
    the round's row of metrics.csv (Strategy.start calls it with round 0 first)."""

    def __init__(self, cfg: StamenConfig, task, model, test, run: RunDirectory, strategy) -> None:
        self.cfg, self.task, self.model, self.run, self.strategy = cfg, task, model, run, strategy
        self.test = evaluated_split(cfg, test)
        self.t0 = time.monotonic()
        self.clock = None  # a simulated clock (measurements/clock.py): elapsed_s is its time, not the host's
        self.last: dict[str, float] = {}
        self.best_round: int | None = None  # the round whose model scored best on the task's metric
        self.best_value: float | None = None

    # --- hooks ------------------------------------------------------------------------------
    def measure(self, arrays: ArrayRecord) -> dict[str, float]:
        """Load the global arrays into the model and evaluate it."""
        weights, head = split_global(from_record(arrays))
        load_adapted_weights(self.model, weights)
        load_head_state(self.model, head)
        with torch.inference_mode():
            return self.task.evaluate(self.model, self.test, self.cfg.eval.batch_size)

    def round_fields(self, rec) -> dict:
        """metrics.csv columns of this family from the strategy's round record."""
        return {"global_rank": rec.global_rank}

    def metrics_text(self, metrics: dict[str, float]) -> str:
        return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())

    def round_text(self, row: dict) -> str:
        return (
            f"clients {row.get('num_clients', '-')}, global rank {row.get('global_rank', '-')}, "
            f"dropped {row.get('dropped', '-')}, downlink {row.get('downlink_bytes', 0) / 1e6:.2f} MB"
        )

    def summary_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        return metrics

    # --- Strategy.start's evaluate_fn ---------------------------------------------------------
    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        metrics = self.measure(arrays)
        row = {f"eval_{k}": v for k, v in metrics.items()}
        row.update(round=server_round, elapsed_s=self.clock.elapsed() if self.clock is not None else time.monotonic() - self.t0)
        rec = next((r for r in self.strategy.rounds if r.server_round == server_round), None)
        if rec is not None:
            row.update(
                train_loss=rec.train_loss,
                num_clients=len(rec.participants) - len(rec.dropped),
                dropped=len(rec.dropped),
                downlink_bytes=sum(rec.downlink_bytes.values()),
                **self.round_fields(rec),
            )
        self.run.append_metrics(row)
        self.last = {"round": server_round, **self.summary_metrics(metrics)}
        self.note_best(server_round, metrics.get(self.task.metric))
        log(
            INFO,
            "round %d/%d: %s | %s, %.0f s elapsed",
            server_round,
            self.cfg.strategy.num_rounds,
            self.metrics_text(metrics),
            self.round_text(row),
            row["elapsed_s"],
        )
        return MetricRecord(metrics)

    def note_best(self, server_round: int, value: float | None) -> None:
        """The best round so far: highest accuracy, lowest perplexity (round 0 counts)."""
        if value is None:
            return
        lower = self.task.metric == "perplexity"
        if self.best_value is None or (value < self.best_value if lower else value > self.best_value):
            self.best_round, self.best_value = server_round, float(value)

    # --- checkpoints (server_app/checkpoint.py) ------------------------------------------------
    def state_dict(self) -> dict:
        return {"elapsed_s": time.monotonic() - self.t0, "best_round": self.best_round, "best_value": self.best_value, "last": self.last}

    def load_state_dict(self, state, node) -> None:
        """elapsed_s goes on from where the run stopped (the time it was down is not counted)."""
        self.t0 = time.monotonic() - float(state["elapsed_s"])
        self.best_round, self.best_value, self.last = state["best_round"], state["best_value"], dict(state["last"])

    def summary(self) -> str:
        return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in self.last.items())
