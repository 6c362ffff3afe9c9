"""What the early-exit strategies share: depth-heterogeneous nodes, each holding the
model up to its deepest exit, and layer-wise averaging over the nodes that hold each
parameter.

A subclass (one file per method: reefl, depthfl, inclusivefl, exclusivefl) sets the exit
module its model carries (``exit_kind``), the device-side method its nodes train with
(``client_method``: its objective is one file of client_app/methods/) and, if it must,
which depths train (:meth:`trains`). The round loop is Flower's ``Strategy.start``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from stamen import keys
from stamen.node_ids import by_node

from .base import SampledStrategy
from .bounds import Bounds
from .lora_records import InvalidUpdate, from_record, to_record


def layerwise_average(
    global_state: Mapping[str, np.ndarray], updates: Sequence[tuple[float, Mapping[str, np.ndarray]]]
) -> dict[str, np.ndarray]:
    """Each parameter becomes the weighted mean over the updates that hold it; a parameter
    no update holds keeps its global value.

    ``updates`` are (weight, {name: array}) pairs, the weight usually the number of
    training examples. The parameters every node holds (embeddings, a shared exit module
    and head) are thereby averaged over everyone, block i over the nodes deep enough to
    run it."""
    out = {}
    for name, value in global_state.items():
        holders = [(w, u[name]) for w, u in updates if name in u]
        total = sum(w for w, _ in holders)
        if not holders or total <= 0:
            out[name] = value
            continue
        acc = np.zeros(value.shape, dtype=np.float64)
        for w, array in holders:
            acc += (w / total) * array
        out[name] = acc.astype(value.dtype)
    return out


def check_update(
    arrays: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]]
) -> dict[str, np.ndarray]:
    """A node must send back exactly the parameters it was sent, same shapes, finite."""
    missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
    if missing or extra:
        raise InvalidUpdate(f"parameters missing {missing[:3]} / not asked for {extra[:3]}")
    for name, value in arrays.items():
        if tuple(value.shape) != expected[name]:
            raise InvalidUpdate(f"{name} has shape {tuple(value.shape)}, expected {expected[name]}")
        if not np.all(np.isfinite(value)):
            raise InvalidUpdate(f"{name} holds NaN or inf")
    return dict(arrays)


@dataclass
class DepthRound:
    """One training round, for logs and metrics.csv."""

    server_round: int
    participants: list[int] = field(default_factory=list)
    exits: dict[int, int] = field(default_factory=dict)  # node -> deepest exit it trained
    skipped: list[int] = field(default_factory=list)  # sampled, but this method does not train its depth
    dropped: dict[int, str] = field(default_factory=dict)
    clipped: dict[int, str] = field(default_factory=dict)  # strategies/bounds.py
    reweighted: dict[int, str] = field(default_factory=dict)
    downlink_bytes: dict[int, int] = field(default_factory=dict)
    train_loss: float = float("nan")


class EarlyExitStrategy(SampledStrategy):
    """Depth-heterogeneous training with layer-wise averaging."""

    exit_kind = "per-exit"  # the model's exit module: "ree" | "per-exit"
    client_method = "exclusivefl"  # the device-side method, whose objective is the nodes' local loss (client_app/methods/)

    def __init__(
        self,
        *,
        node_exits: Mapping[int, int],
        num_exits: int,
        required_exits: Mapping[str, int],
        distill_weight: float = 1.0,
        distill_rampup_rounds: int = 0,
        fraction_train: float = 1.0,
        min_nodes: int = 2,
        message_ttl: float | None = None,
        bounds: Bounds | None = None,
    ) -> None:
        super().__init__(fraction_train=fraction_train, min_nodes=min_nodes, message_ttl=message_ttl, bounds=bounds)
        bad = {n: e for n, e in node_exits.items() if not 1 <= e <= num_exits}
        if bad:
            raise ValueError(f"nodes {bad}: max exit must lie in 1..{num_exits}")
        self.node_exits = dict(node_exits)
        self.num_exits = num_exits
        self.required_exits = dict(required_exits)
        self.distill_weight = distill_weight
        self.distill_rampup_rounds = distill_rampup_rounds
        self.rounds: list[DepthRound] = []
        self._global: dict[str, np.ndarray] = {}
        self._sent: dict[int, dict[str, tuple[int, ...]]] = {}

    @classmethod
    def from_config(cls, cfg, **common) -> EarlyExitStrategy:
        return cls(
            distill_weight=cfg.early_exit.distill_weight,
            distill_rampup_rounds=cfg.early_exit.distill_rampup_rounds,
            **common,
        )

    # --- hooks --------------------------------------------------------------------------
    def trains(self, max_exit: int) -> bool:
        """Whether a node of this depth takes part in training."""
        return True

    def round_distill_weight(self, server_round: int) -> float:
        """Linear ramp-up over ``distill_rampup_rounds`` to ``distill_weight``."""
        if self.distill_rampup_rounds <= 0:
            return self.distill_weight
        return self.distill_weight * min(1.0, server_round / self.distill_rampup_rounds)

    # --- Flower Strategy ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {**super().state_dict(), "node_exits": dict(self.node_exits)}

    def load_state_dict(self, state, node) -> None:
        super().load_state_dict(state, node)
        self.node_exits.update(by_node(state["node_exits"], node))

    def exit_of(self, node_id: int) -> int:
        return self.node_exits.get(node_id, self.num_exits)

    def holds(self, name: str, max_exit: int) -> bool:
        return self.required_exits.get(name, 1) <= max_exit

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t└──> early exits: %s / %s, max exit by node %s", self.exit_kind, self.client_method, self.node_exits)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global = from_record(arrays)
        node_ids = self.sample(grid)
        record = DepthRound(server_round)
        self._sent = {}
        messages = []
        weight = self.round_distill_weight(server_round)
        for node_id in node_ids:
            max_exit = self.exit_of(node_id)
            if not self.trains(max_exit):
                record.skipped.append(node_id)
                continue
            down = {k: v for k, v in self._global.items() if self.holds(k, max_exit)}
            msg = self.instruction(
                node_id, server_round, down, config,
                **{keys.MAX_EXIT: max_exit, keys.EXIT_KIND: self.exit_kind, keys.DISTILL_WEIGHT: float(weight)},
            )
            messages.append(msg)
            self._sent[node_id] = {k: tuple(v.shape) for k, v in down.items()}
            record.participants.append(node_id)
            record.exits[node_id] = max_exit
            record.downlink_bytes[node_id] = msg.content.array_records[keys.ARRAYS].count_bytes()
        self.rounds.append(record)
        if not messages:
            log(WARNING, "configure_train: no sampled node trains under %s (skipped %s)", type(self).__name__, record.skipped)
        log(INFO, "configure_train: %d nodes, max exits %s, skipped %d", len(messages), sorted(record.exits.values()), len(record.skipped))
        return messages

    def parse(self, node_id: int, content: RecordDict) -> tuple[float, dict[str, np.ndarray]]:
        """(num-examples, arrays) of a reply, checked against what the node was sent.
        Raises InvalidUpdate (or KeyError for a missing record)."""
        arrays = check_update(from_record(content.array_records[keys.ARRAYS]), self._sent.get(node_id, {}))
        n = int(content.metric_records[keys.METRICS][keys.NUM_EXAMPLES])
        if n <= 0:
            raise InvalidUpdate(f"num-examples = {n}")
        return float(n), arrays

    # --- the update, as strategies/bounds.py measures it --------------------------------
    def update_parts(self, node_id: int, parsed) -> list[np.ndarray]:
        """The change of every parameter from what the node was sent."""
        _, arrays = parsed
        return [arrays[k].astype(np.float64) - self._global[k] for k in sorted(arrays)]

    def scaled(self, node_id: int, parsed, t: float):
        weight, arrays = parsed
        return weight, {k: (self._global[k] + t * (v - self._global[k])).astype(v.dtype) for k, v in arrays.items()}

    def weight_of(self, parsed) -> float:
        return parsed[0]

    def with_weight(self, parsed, weight: float):
        return weight, parsed[1]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        record = self.rounds[-1] if self.rounds and self.rounds[-1].server_round == server_round else DepthRound(server_round)
        accepted = self.collect(record, replies, self.parse)
        updates = [parsed for _, parsed, _ in accepted]
        losses = [float(metrics.get(keys.TRAIN_LOSS, math.nan)) for _, _, metrics in accepted]
        if not updates:
            log(WARNING, "aggregate_train: no valid update in round %d; the global model is unchanged", server_round)
            return None, None
        record.train_loss = float(np.average(losses, weights=[w for w, _ in updates]))
        new_global = layerwise_average(self._global, updates)
        metrics = MetricRecord(
            {keys.TRAIN_LOSS: record.train_loss, "num-clients": len(updates), "dropped": len(record.dropped)}
        )
        return to_record(new_global), metrics
