"""Checkpoint after every round, and continue a killed run from its last one.

The ServerApp (server_app/app.py) builds one :class:`RunCheckpoints` per run. Its
:meth:`RunCheckpoints.after` wraps the round's evaluation: once the global model of a round
is evaluated and its metrics.csv row written, the round is complete and its checkpoint is
saved (server_app/checkpoint.py says what is in it and how it is written).

A resumed run (``checkpoint.resume-from = "runs/<run-id>"``, or ``stamen resume``) is a new
Flower run that continues the old run directory:

1. the last complete checkpoint is read, and the run config is checked against it
   (only ``strategy.num-rounds`` and where things listen may differ);
2. metrics.csv and rounds.csv are cut back to its round (a round the crash interrupted
   may have left a row), clients.csv and resources.csv continue from its rows;
3. the nodes are profiled as in any run, and matched to the checkpoint's by partition id
   (:func:`match_nodes`): with ``--database`` a SuperNode keeps its id; without, it
   registers under a new one, and every node-keyed piece of state is carried over;
4. the strategy, the wrappers, the evaluation and the server's RNGs load their state;
5. Flower's ``Strategy.start`` runs the remaining rounds, through :class:`RoundOffset`,
   which numbers them on from the checkpoint's round.

No node holds anything of a new Flower run, so every node's first downlink is dense.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from stamen import keys
from stamen.config import ConfigError
from stamen.wrapping import StrategyWrapper
from strategies.lora_records import from_record

from . import checkpoint
from .run_dir import RunDirectory

# keys a resumed run may set differently from the run it continues
MAY_DIFFER = ("strategy.num-rounds", "checkpoint.", "output.", "measure.collector", "strategy.poll-interval",
              "strategy.query-timeout", "strategy.round-timeout", "strategy.min-nodes", "strategy.min-replies")


def check_config(saved: Mapping[str, Any], now: Mapping[str, Any]) -> None:
    """ConfigError naming every key (but those of MAY_DIFFER) whose value differs."""
    differ = sorted(k for k in set(saved) | set(now) if not k.startswith(MAY_DIFFER) and saved.get(k) != now.get(k))
    if differ:
        shown = ", ".join(f"{k} = {saved.get(k)!r} in the checkpoint, {now.get(k)!r} now" for k in differ[:4])
        raise ConfigError(
            f"checkpoint.resume-from: this run's config differs from the run it resumes ({shown}"
            f"{', ...' if len(differ) > 4 else ''}); pass that run's run-config.toml: "
            "flwr run . <connection> --run-config <run dir>/run-config.toml --run-config 'checkpoint.resume-from=\"<run dir>\"'"
        )


def match_nodes(saved: Mapping[int, Any], profiles: Mapping[int, Mapping]) -> dict[int, int]:
    """{checkpoint node id: this run's node id}. ``saved``: checkpoint node -> its
    partition id (None if it reported none). A node id both runs know is the same node
    (a SuperLink with ``--database``); any other is matched by partition id."""
    now = {n: p.get(keys.NODE_PARTITION_ID) for n, p in profiles.items()}
    out = {old: old for old in saved if old in now}
    free = {part: n for n, part in now.items() if n not in out.values() and part is not None}
    for old, part in saved.items():
        if old not in out and part is not None and part in free:
            out[old] = free.pop(part)
    return out


def rng_state() -> dict[str, Any]:
    """The server's generators: Python's (Flower samples nodes with it), numpy's, torch's."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state().numpy()}


def set_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(torch.from_numpy(np.asarray(state["torch"], dtype=np.uint8)))


def flat_adapter(factors: Mapping[str, tuple[np.ndarray, np.ndarray]] | None) -> dict[str, np.ndarray]:
    """{module: (A, B)} as {module.lora_A: A, module.lora_B: B} ({} for None)."""
    out = {}
    for m, (a, b) in (factors or {}).items():
        out[m + keys.LORA_A], out[m + keys.LORA_B] = a, b
    return out


class RoundOffset(StrategyWrapper):
    """``strategy`` with every round number moved on by ``offset``: Flower's
    ``Strategy.start`` counts a run's rounds from 1, a resumed run continues at
    ``offset + 1``. Also wraps the evaluation, which skips Flower's round 0 (the
    checkpoint's round was evaluated before the crash)."""

    def __init__(self, strategy: Strategy, offset: int) -> None:
        super().__init__(strategy)
        self.offset = offset

    def start(self, grid: Grid, *args, **kwargs):
        if self.offset:
            log(INFO, "resuming after round %d: Flower's log counts this run's rounds from 1", self.offset)
        return super().start(grid, *args, **kwargs)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_train(server_round + self.offset, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        return self.strategy.aggregate_train(server_round + self.offset, replies)

    def configure_evaluate(self, server_round, arrays, config, grid):
        return self.strategy.configure_evaluate(server_round + self.offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        return self.strategy.aggregate_evaluate(server_round + self.offset, replies)

    def evaluation(self, evaluate: Callable[[int, ArrayRecord], MetricRecord | None]):
        if not self.offset:
            return evaluate

        def shifted(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            return None if server_round == 0 else evaluate(server_round + self.offset, arrays)

        return shifted


class RunCheckpoints:
    """Saves a checkpoint after every round of one run (see the module docstring).

    ``strategy``, ``measurements``, ``evaluation``: each has ``state_dict()`` and
    ``load_state_dict(state, node)``; ``profiles``: the run's node profiles, as they grow
    (nodes that join mid-run are added to it), read at each save for the node ->
    partition map."""

    def __init__(self, run: RunDirectory, *, keep: int, config: Mapping[str, Any], strategy, measurements, evaluation,
                 profiles: Mapping[int, Mapping], clock=None) -> None:
        self.run, self.keep, self.config = run, keep, dict(config)
        self.parts: dict[str, Any] = {"strategy": strategy, "measurements": measurements, "evaluation": evaluation}
        if clock is not None:  # a simulated clock (measurements/clock.py): its elapsed time goes on after a resume
            self.parts["clock"] = clock
        self.profiles = profiles

    @property
    def best_round(self) -> int | None:
        """The round whose model scored best (server_app/evaluation.py); its checkpoint is kept."""
        return self.parts["evaluation"].best_round

    def adapter(self) -> dict[str, np.ndarray]:
        """The strategy's global adapter in checkpoint form ({} where it keeps none)."""
        return flat_adapter(self.parts["strategy"].global_adapter())

    def after(self, evaluate):
        """``evaluate`` (Strategy.start's evaluate_fn) followed by this round's checkpoint."""

        def evaluate_and_save(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            metrics = evaluate(server_round, arrays)
            if server_round > 0:
                self.save(server_round, from_record(arrays))
            return metrics

        return evaluate_and_save

    def save(self, server_round: int, global_arrays: Mapping[str, np.ndarray]) -> None:
        t0 = time.perf_counter()
        state = {name: part.state_dict() for name, part in self.parts.items()}
        nodes = {n: p.get(keys.NODE_PARTITION_ID) for n, p in self.profiles.items()}
        state.update(rng=rng_state(), nodes=nodes, config=self.config)
        path = checkpoint.write(self.run.path, server_round, state=state, global_arrays=global_arrays, adapter=self.adapter(),
                                keep=self.keep, also_keep=self.best_round)
        log(INFO, "checkpoint: round %d in %s (%.1f MB, %.2f s)", server_round, path.name, checkpoint.size_bytes(path) / 1e6, time.perf_counter() - t0)

    def restore(self, saved: checkpoint.Checkpoint, profiles: Mapping[int, Mapping]) -> None:
        """Load every part's state from ``saved``, with the nodes matched to this run's."""
        mapping = match_nodes(saved.state["nodes"], profiles)
        gone = sorted(set(saved.state["nodes"]) - set(mapping))
        log(INFO, "resume: %d of %d nodes matched (%s)%s", len(mapping), len(saved.state["nodes"]),
            ", ".join(f"{o}->{n}" for o, n in sorted(mapping.items())), f"; not here: {gone}" if gone else "")
        if gone:
            log(WARNING, "resume: nodes %s of the checkpoint did not come back; their state is dropped", gone)
        for name, part in self.parts.items():
            part.load_state_dict(saved.state[name], mapping.get)
        set_rng_state(saved.state["rng"])
