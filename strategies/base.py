"""What every LoRA strategy of the project shares: per-node ranks, per-node messages,
checked replies, and a record of each round for the run directory.

Built on Flower's FedAvg for sampling and its ``start`` round loop; a subclass overrides
two hooks: :meth:`downlink` (what a node receives) and :meth:`aggregate_lora` (the math).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from flwr.supercore import log

from stamen import keys
from stamen.node_ids import by_node, renamed_row

from .bounds import Bounds, bounded_weights, lora_change, norm_bound, norm_of, scale_to_bound
from .lora_records import ClientLoRA, InvalidUpdate, from_record, init_factors, parse_reply, split_global, to_record


@dataclass
class RoundRecord:
    """What happened in one training round, for logs and metrics.csv."""

    server_round: int
    participants: list[int] = field(default_factory=list)
    ranks: dict[int, int] = field(default_factory=dict)
    dropped: dict[int, str] = field(default_factory=dict)  # node -> reason
    clipped: dict[int, str] = field(default_factory=dict)  # node -> why its update was scaled down (strategies/bounds.py)
    reweighted: dict[int, str] = field(default_factory=dict)  # node -> why its weight is below its claim
    downlink_bytes: dict[int, int] = field(default_factory=dict)
    sync_modes: dict[int, str] = field(default_factory=dict)
    train_loss: float = float("nan")
    global_rank: int = 0


class SampledStrategy(FedAvg):
    """What every strategy of the project takes from Flower's FedAvg and adds to it:
    node sampling, a message TTL, evaluation on the server only (a held-out split), and
    dropped nodes logged with the reason. The LoRA and the early-exit families build on it."""

    def __init__(
        self, *, fraction_train: float = 1.0, min_nodes: int = 2, message_ttl: float | None = None, bounds: Bounds | None = None
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=0.0,  # evaluation is server-side, on a held-out split
            min_train_nodes=min_nodes,
            min_available_nodes=min_nodes,
        )
        self.message_ttl = message_ttl
        self.retired: dict[int, str] = {}  # node -> why it trains no more (its privacy budget is spent)
        self.privacy_log: list[dict] = []  # one row per DP reply: privacy.csv
        self.bounds = bounds if bounds is not None else Bounds()  # what one reply can do to the aggregate
        self.declared_examples: dict[int, float] = {}  # node -> num-examples of its device profile (the weight's cap)
        self.stateless: set[int] = set()  # nodes that keep no global weights between rounds: dense downlinks only
        self._records: tuple[int, dict] = (-1, {})  # (round, the round's shared downlink records), see downlink_record

    PRIVACY_COLUMNS = ("round", "node_id", "epsilon", "delta", "noise_multiplier", "sample_rate", "steps", "status")

    def attach_run(self, run_dir, round_times=None) -> None:
        """The run directory (for state a strategy saves) and ``round_times(server_round)
        -> {node: seconds}`` from the instrumentation layer; most strategies need neither."""

    def finish(self) -> None:
        """After the last round."""

    def forget_node(self, node_id: int) -> None:
        """Called when a node failed or went silent: its local state is unknown."""

    def global_adapter(self) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
        """The global model as an adapter on the frozen base weights, its scaling folded
        into B (``B @ A`` is the delta), for ``stamen export --format adapter``; None
        where the strategy keeps none (FLoRA and FedSpine merge into the weights, the
        early-exit strategies train whole modules)."""
        return None

    # --- checkpoints (server_app/checkpoint.py) ---------------------------------------------
    def state_dict(self) -> dict:
        """What this strategy needs to continue a run from the round just ended: plain data
        and numpy arrays. What the nodes hold is not in it: a resumed run is a new Flower
        run, every node starts it with an empty state, so its first downlink is dense.
        A subclass with state of its own adds it here and in :meth:`load_state_dict`."""
        return {"retired": dict(self.retired), "privacy_log": list(self.privacy_log)}

    def load_state_dict(self, state: Mapping, node) -> None:
        """Continue from ``state`` (a :meth:`state_dict`). ``node(old_id)`` is the id the
        node of that id has in this run, or None where it is gone: after a SuperLink
        restart without ``--database`` the nodes register again under new ids."""
        self.retired.update(by_node(state["retired"], node))
        self.privacy_log = [renamed_row(row, node) for row in state["privacy_log"]]

    def observe_reply(self, node_id: int, metrics) -> None:
        """Called with the metrics of every accepted reply (e.g. a bandit's reward)."""

    # the median rule of the update bound; central DP turns it off (strategies/bounds.py)
    relative_bound = True

    def update_parts(self, node_id: int, parsed) -> list[np.ndarray]:
        """The node's update, measured where this strategy aggregates (strategies/bounds.py)."""
        raise NotImplementedError

    def scaled(self, node_id: int, parsed, t: float):
        """``parsed`` with its update scaled by ``t`` in [0, 1] (0: no change)."""
        raise NotImplementedError

    def weight_of(self, parsed) -> float:
        raise NotImplementedError

    def with_weight(self, parsed, weight: float):
        raise NotImplementedError

    def round_outcomes(self, server_round: int) -> dict[int, tuple[str, str]]:
        """What this strategy did with each reply of a round: node -> (status, reason), for
        clients.csv: ``rejected`` (dropped: invalid, over the bound, budget spent, late),
        ``clipped`` or ``reweighted`` (accepted, bounded). Nodes not named were accepted as sent."""
        record = next((r for r in reversed(getattr(self, "rounds", [])) if r.server_round == server_round), None)
        if record is None:
            return {}
        out = {node: ("reweighted", reason) for node, reason in record.reweighted.items()}
        for node, reason in record.clipped.items():
            out[node] = ("clipped", "; ".join(filter(None, (reason, record.reweighted.get(node)))))
        out.update({node: ("rejected", reason) for node, reason in record.dropped.items()})
        return out

    def declare_profiles(self, profiles: Mapping[int, Mapping]) -> None:
        """Note each node's ``num-examples`` from its device profile (the cap of its
        weight), and whether it keeps the global weights between rounds (a simulated node
        does not: client_app/sync.py)."""
        for node_id, profile in profiles.items():
            if profile.get(keys.KEEPS_GLOBAL) is False:
                self.stateless.add(node_id)
            n = profile.get(keys.NUM_EXAMPLES)
            if isinstance(n, (int, float)) and not isinstance(n, bool) and n > 0:
                self.declared_examples[node_id] = float(n)

    client_method: str | None = None  # the device-side method that serves the instructions (client_app/methods/)

    def instruction(self, node_id: int, server_round: int, arrays: Mapping[str, np.ndarray], config: ConfigRecord, **extra) -> Message:
        """One node's train message: its arrays, the round's config, the round, the
        device-side method, and what this node needs besides (``extra``)."""
        fields = {**dict(config), keys.SERVER_ROUND: server_round, keys.METHOD: self.client_method, **extra}
        return Message(
            RecordDict({keys.ARRAYS: self.downlink_record(server_round, arrays), keys.CONFIG: ConfigRecord(fields)}),
            dst_node_id=node_id,
            message_type=MessageType.TRAIN,
            ttl=self.message_ttl,
            group_id=str(server_round),
        )

    def downlink_record(self, server_round: int, arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
        """The record that carries ``arrays`` down. Nodes sent the same arrays in a round
        (the same numpy objects: the dense global model) share one record, so it is packed,
        hashed and held once whatever the number of nodes, and Flower's object store
        pushes it to the SuperLink once (its objects are content-addressed). Without this
        the ServerApp held one copy of the model per node: 7 GB for 1,000 MiniLM nodes."""
        key = tuple((name, id(a)) for name, a in arrays.items())
        if self._records[0] != server_round:
            self._records = (server_round, {})
        shared = self._records[1]
        if key not in shared:  # the arrays are kept with it, so their ids cannot be reused this round
            shared[key] = (dict(arrays), to_record(arrays))
        return shared[key][1]

    def collect(self, record, replies: Iterable[Message], parse) -> list[tuple[int, object, MetricRecord]]:
        """The round's accepted replies as ``(node, parse(node, content), metrics)``. A node
        is dropped from ``record`` with its reason when its reply is an error, its privacy
        budget is spent, ``parse`` refuses it (InvalidUpdate, or a missing key), or it
        never replied; a node that failed or went silent is also forgotten."""
        accepted, answered = [], set()
        for msg in replies:
            node_id = msg.metadata.src_node_id
            answered.add(node_id)
            if msg.has_error():
                self._drop(record, node_id, f"client error: {msg.error.reason}")
                self.forget_node(node_id)
                continue
            if self.take_privacy(record, node_id, msg.content):
                continue
            try:
                parsed = parse(node_id, msg.content)
                metrics = msg.content.metric_records[keys.METRICS]
            except (InvalidUpdate, KeyError) as err:
                self._drop(record, node_id, f"invalid update: {err}")
                continue
            accepted.append((node_id, parsed, metrics))
        for node_id in set(record.participants) - answered:
            self._drop(record, node_id, "no reply before the round timeout")
            self.forget_node(node_id)
        accepted = self.bound(record, accepted)
        for node_id, _, metrics in accepted:
            self.observe_reply(node_id, metrics)
        return accepted

    def bound(self, record, accepted: list[tuple[int, object, MetricRecord]]) -> list[tuple[int, object, MetricRecord]]:
        """The round's valid replies with every update within this round's norm bound
        (clipped to it, or dropped) and every weight within what the server can justify
        (strategies/bounds.py). Each decision is logged and kept in ``record``."""
        rule = self.bounds
        norms = {node_id: norm_of(self.update_parts(node_id, parsed)) for node_id, parsed, _ in accepted}
        limit, how = norm_bound(list(norms.values()), multiple=rule.norm_multiple, cap=rule.norm_cap, relative=self.relative_bound)
        kept = []
        for node_id, parsed, metrics in accepted:
            if norms[node_id] > limit:
                reason = f"update norm {norms[node_id]:.4g} over the bound {limit:.4g} ({how})"
                if rule.over_bound == "drop":
                    self._drop(record, node_id, reason)
                    continue
                t = scale_to_bound(lambda t, n=node_id, p=parsed: norm_of(self.update_parts(n, self.scaled(n, p, t))), limit)
                parsed = self.scaled(node_id, parsed, t)
                record.clipped[node_id] = f"{reason}; scaled by {t:.3g}"
                log(WARNING, "clipping node %d's update in round %d: %s", node_id, record.server_round, record.clipped[node_id])
            kept.append((node_id, parsed, metrics))
        claims = {node_id: self.weight_of(parsed) for node_id, parsed, _ in kept}
        weights = bounded_weights(claims, declared=self.declared_examples, share=rule.max_weight_share, equal=rule.weights == "equal")
        out = []
        for node_id, parsed, metrics in kept:
            if rule.weights == "examples" and weights[node_id] < claims[node_id]:
                record.reweighted[node_id] = (
                    f"num-examples {claims[node_id]:.6g} counted as {weights[node_id]:.6g} (its profile said "
                    f"{self.declared_examples.get(node_id, 'nothing')}; at most {rule.max_weight_share:g} of the round's total)"
                )
                log(WARNING, "node %d in round %d: %s", node_id, record.server_round, record.reweighted[node_id])
            out.append((node_id, self.with_weight(parsed, weights[node_id]), metrics))
        return out

    # ``admit(grid, node_ids)``, set by the ServerApp: profile nodes that connected after the
    # run began (a new device, or a SuperNode that restarted under a new id) and give each
    # its own capacity (server_app/app.py); ``known_nodes``: the nodes already profiled
    admit = None
    known_nodes: set[int] | None = None

    def admit_new_nodes(self, admit, known: Iterable[int]) -> None:
        """From now on, ``admit(grid, node_ids)`` the nodes that connect and are not in ``known``."""
        self.admit, self.known_nodes = admit, set(known)

    def sample(self, grid: Grid) -> list[int]:
        """This round's nodes: ``fraction_train`` of the connected ones, at least ``min_nodes``;
        a retired node is never sampled again. Nodes that are new to the run are profiled
        first (:attr:`admit`)."""
        if self.admit is not None and self.known_nodes is not None:
            new = sorted(set(grid.get_node_ids()) - self.known_nodes)
            if new:
                self.known_nodes.update(new)
                self.admit(grid, new)
        connected = len(list(grid.get_node_ids()))
        wanted = max(int(connected * self.fraction_train), self.min_train_nodes)
        if not self.retired:
            node_ids, _ = sample_nodes(grid, self.min_available_nodes, wanted)
            return node_ids
        everyone, _ = sample_nodes(grid, self.min_available_nodes, connected)  # all of them, shuffled
        return [n for n in everyone if n not in self.retired][:wanted]

    def take_privacy(self, record, node_id: int, content: RecordDict) -> bool:
        """Note a reply's privacy figures (``dp.mode = "local"``) in :attr:`privacy_log`;
        True when the node's budget is spent: it is dropped from this round with its
        reason and never sampled again (the round goes on with the others).

        Also True, with the same consequences, when the node's DP steps went backwards:
        it lost its ledger (e.g. a SuperNode restarted with a fresh state) and would spend
        its budget again from zero; what it has already spent stands."""
        metrics = content.metric_records.get(keys.METRICS)
        if metrics is None or keys.DP_EPSILON not in metrics:
            return False
        before = max((row["steps"] for row in self.privacy_log if row["node_id"] == node_id), default=0)
        backwards = int(metrics[keys.DP_STEPS]) < before
        stopped = bool(metrics.get(keys.DP_STOPPED, 0))
        self.privacy_log.append(
            {
                "round": record.server_round,
                "node_id": node_id,
                "epsilon": float(metrics[keys.DP_EPSILON]),
                "delta": float(metrics[keys.DP_DELTA]),
                "noise_multiplier": float(metrics[keys.DP_NOISE]),
                "sample_rate": float(metrics[keys.DP_SAMPLE_RATE]),
                "steps": int(metrics[keys.DP_STEPS]),
                "status": "refused" if backwards else ("budget-spent" if stopped else "trained"),
            }
        )
        if backwards:
            reason = f"its DP steps went backwards ({int(metrics[keys.DP_STEPS])} after {before}): its privacy ledger was lost"
            self.retired[node_id] = reason
            self._drop(record, node_id, reason)
            return True
        if stopped:
            status = content.config_records.get(keys.DP_STATUS)
            reason = str(status["reason"]) if status is not None and "reason" in status else "privacy budget spent"
            self.retired[node_id] = reason
            self._drop(record, node_id, reason)
        return stopped

    def privacy_summary(self) -> dict[int, float]:
        """Each node's epsilon at the end: the largest figure it reported (a later, smaller
        one cannot undo what was spent)."""
        out: dict[int, float] = {}
        for row in self.privacy_log:
            out[row["node_id"]] = max(out.get(row["node_id"], 0.0), row["epsilon"])
        return out

    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round, replies) -> MetricRecord | None:
        return None

    @staticmethod
    def _drop(record, node_id: int, reason: str) -> None:
        """``record``: a round record with ``dropped`` and ``server_round``."""
        record.dropped[node_id] = reason
        log(WARNING, "dropping node %d from round %d: %s", node_id, record.server_round, reason)


class LoRAStrategy(SampledStrategy):
    """Base for heterogeneous-LoRA strategies (sampling and reply checks from here)."""

    def __init__(
        self,
        *,
        node_ranks: Mapping[int, int],
        default_rank: int,
        lora_alpha: float,
        fraction_train: float = 1.0,
        min_nodes: int = 2,
        message_ttl: float | None = None,
        seed: int = 0,
        bounds: Bounds | None = None,
    ) -> None:
        super().__init__(fraction_train=fraction_train, min_nodes=min_nodes, message_ttl=message_ttl, bounds=bounds)
        self.node_ranks = dict(node_ranks)
        self.default_rank = default_rank
        self.lora_alpha = lora_alpha
        self.seed = seed
        self.rounds: list[RoundRecord] = []
        self._current: RoundRecord | None = None
        self._global: dict[str, np.ndarray] = {}
        self._sent_adapter: dict[int, dict[str, tuple[np.ndarray, np.ndarray]]] = {}  # node -> the adapter it started from

    central_dp_space: str | None = None  # "product" | "factors" | "product-change": dp.mode = "central" can wrap it (strategies/central_dp.py)
    # Central DP sets this: a participant without a valid update counts as sending its zero
    # update (zero_update), so the round's mean has the cohort's size as its fixed
    # denominator and one node's presence moves it by at most C / cohort (docs/privacy.md).
    absent_as_zero = False
    client_method = "lora"  # client_app/methods/lora.py
    accepts_pruned_ranks = False  # True: a reply may carry a smaller rank than assigned (HetLoRA)
    accepts_pruned_units = False  # True: a reply carries factors of pruned matrices and the kept indices (FedSpine)

    @classmethod
    def from_config(cls, cfg, **common) -> LoRAStrategy:
        """Build from the run config; ``common`` holds what every strategy takes. A strategy
        with options of its own overrides this and reads them from ``cfg``."""
        return cls(**common)

    # --- hooks for subclasses -------------------------------------------------------
    def downlink(self, node_id: int, global_arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict]:
        """Arrays and extra config for one node; default: the whole global state."""
        return global_arrays, {}

    def aggregate_lora(
        self, updates: list[ClientLoRA], heads: list[dict[str, np.ndarray]], global_arrays: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """New global state from the checked updates of one round."""
        raise NotImplementedError

    def zero_update(self, node_id: int) -> tuple[ClientLoRA, dict[str, np.ndarray]]:
        """The update of a node that changes nothing: zero factors (product 0) and the head
        it was sent. A strategy whose nodes start from a sent adapter overrides it."""
        weights_now, head_now = split_global(self._global)
        factors = {m: (np.zeros((1, w.shape[1]), w.dtype), np.zeros((w.shape[0], 1), w.dtype)) for m, w in weights_now.items()}
        return ClientLoRA(factors=factors, num_examples=1, scaling=1.0, node_id=node_id), dict(head_now)

    def noise_release(self, new_global: dict[str, np.ndarray], noise) -> dict[str, np.ndarray]:
        """Central DP: add ``noise(array) -> array`` to what this round releases to the
        nodes and return the global arrays the server keeps (see central_dp_space)."""
        raise NotImplementedError(f"{type(self).__name__} does not support central DP")

    # --- Flower Strategy ---------------------------------------------------------------
    def rank_of(self, node_id: int) -> int:
        return self.node_ranks.get(node_id, self.default_rank)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "node_ranks": dict(self.node_ranks)}

    def load_state_dict(self, state, node) -> None:
        super().load_state_dict(state, node)
        self.node_ranks.update(by_node(state["node_ranks"], node))  # e.g. HetLoRA's self-pruned ranks

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t└──> LoRA: alpha %s, ranks by node %s", self.lora_alpha, self.node_ranks)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global = from_record(arrays)
        self._sent_adapter = {}
        node_ids = self.sample(grid)
        record = RoundRecord(server_round)
        messages = []
        for node_id in node_ids:
            rank = self.rank_of(node_id)
            down, extra = self.downlink(node_id, self._global)
            self._sent_adapter[node_id] = init_factors(down)
            msg = self.instruction(node_id, server_round, down, config, **{keys.LORA_RANK: rank, keys.LORA_ALPHA: float(self.lora_alpha), **extra})
            messages.append(msg)
            record.participants.append(node_id)
            record.ranks[node_id] = rank
            record.downlink_bytes[node_id] = msg.content.array_records[keys.ARRAYS].count_bytes()
            record.sync_modes[node_id] = str(extra.get(keys.SYNC_MODE, "full"))
        self._current = record
        self.rounds.append(record)
        log(INFO, "configure_train: %d nodes, ranks %s", len(node_ids), sorted(record.ranks.values()))
        return messages

    def parse(self, node_id: int, content: RecordDict) -> tuple[ClientLoRA, dict[str, np.ndarray]]:
        """One node's reply to this round, checked against what it was asked for: the
        modules and shapes of the global state, and the rank it was assigned. The update's
        scaling comes from here only (central DP clips with it too). Raises InvalidUpdate."""
        weights_now, head_now = split_global(self._global)
        update, head = parse_reply(
            content,
            module_shapes={m: tuple(w.shape) for m, w in weights_now.items()},
            head_shapes={k: tuple(v.shape) for k, v in head_now.items()},
            rank=self._current.ranks.get(node_id, -1) if self._current is not None else -1,
            allow_smaller_rank=self.accepts_pruned_ranks,
            allow_pruned=self.accepts_pruned_units,
        )
        return dataclasses.replace(update, node_id=node_id), head

    # --- the update, as strategies/bounds.py measures it --------------------------------
    def update_parts(self, node_id: int, parsed) -> list[np.ndarray]:
        """``s B A - s B0 A0`` per adapted matrix (``B0 A0``: the adapter the node was sent;
        none, a fresh LoRA: 0), and the head's change."""
        update, head = parsed
        _, head_now = split_global(self._global)
        return lora_change(update.factors, update.scaling, self._sent_adapter.get(node_id, {}), head, head_now)

    def scaled(self, node_id: int, parsed, t: float):
        """A fresh LoRA: ``t B`` (the product scales by t exactly). An adapter the node was
        sent: each factor moved t of the way from the one sent (of the reply's rank); the
        head: t of its change."""
        update, head = parsed
        sent = self._sent_adapter.get(node_id, {})
        _, head_now = split_global(self._global)
        factors = {}
        for module, (a, b) in update.factors.items():
            if module in sent:
                a0, b0 = sent[module][0][: a.shape[0]], sent[module][1][:, : b.shape[1]]
                factors[module] = ((a0 + t * (a - a0)).astype(a.dtype), (b0 + t * (b - b0)).astype(b.dtype))
            else:
                factors[module] = (a, (t * b).astype(b.dtype))
        new_head = {k: (head_now[k] + t * (v - head_now[k])).astype(v.dtype) for k, v in head.items()}
        return dataclasses.replace(update, factors=factors), new_head

    def weight_of(self, parsed) -> float:
        return float(parsed[0].num_examples)

    def with_weight(self, parsed, weight: float):
        update, head = parsed
        return dataclasses.replace(update, num_examples=weight), head

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        record = self._current or RoundRecord(server_round)
        accepted = self.collect(record, replies, self.parse)
        updates = [update for _, (update, _), _ in accepted]
        heads = [head for _, (_, head), _ in accepted]
        losses = [metrics.get(keys.TRAIN_LOSS, float("nan")) for _, _, metrics in accepted]
        if updates:
            record.train_loss = float(np.average(losses, weights=[u.num_examples for u in updates]))
            record.global_rank = sum(next(iter(u.factors.values()))[0].shape[0] for u in updates)
        elif not self.absent_as_zero:
            log(WARNING, "aggregate_train: no valid update in round %d; the global model is unchanged", server_round)
            return None, None
        num_valid = len(updates)
        if self.absent_as_zero:  # the mean over the whole cohort: whoever sent nothing valid sent no change
            valid = {u.node_id for u in updates}
            for node_id in record.participants:
                if node_id not in valid:
                    zero, head = self.zero_update(node_id)
                    updates.append(zero)
                    heads.append(head)
        new_global = self.aggregate_lora(updates, heads, self._global)
        metrics = MetricRecord(
            {
                keys.TRAIN_LOSS: record.train_loss,
                "num-clients": num_valid,
                "global-rank": record.global_rank,
                "dropped": len(record.dropped),
            }
        )
        return to_record(new_global), metrics
