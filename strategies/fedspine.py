"""FedSpine-style training (Yao et al., arXiv 2501.02438): every device prunes heads and
MLP channels and trains a LoRA, with its (pruning ratio, LoRA rank) chosen each round by a
per-device bandit whose reward uses the device's measured round time.

Round t, for each sampled node: its bandit (strategies/bandit.py) picks an arm; the node
gets the dense global weights, the arm's rank and ratio; it prunes gradually while it
trains (ml/pruning.py) and replies with LoRA factors of its pruned matrices and the kept
indices. The server adds the masked average of the updates (strategies/pruned_lora.py:
a pruned unit contributes nothing) to the global weights. At the start of round t+1 each
node's arm is rewarded (strategies/bandit.py: reward) from its relative loss improvement
(the model it sends against the unpruned model it received, on the same batches) and its
round time (downlink + train + uplink, from the instrumentation layer) relative
to the median node's. The bandits' state is written to ``bandit_state.json`` after every
update and can seed a later run (``fedspine.state-file``), keyed by node id.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.supercore import log

from stamen import keys
from stamen.node_ids import by_node, renamed_row

from .bandit import Arm, DiscountedUCB, arm_grid, reward
from .base import LoRAStrategy
from .lora_records import ClientLoRA, join_global, split_global, weighted_mean
from .pruned_lora import PrunedUpdate, masked_average

RoundTimes = Callable[[int], Mapping[int, float]]  # server round -> {node: seconds}


class FedSpine(LoRAStrategy):
    accepts_pruned_units = True
    client_method = "fedspine"  # client_app/methods/fedspine.py: prunes while it trains

    def __init__(
        self,
        *,
        arms: Sequence[Arm],
        gamma: float = 0.95,
        exploration: float = 0.5,
        time_weight: float = 0.5,
        state_path: str | Path | None = None,
        resume_from: str | Path | None = None,
        round_times: RoundTimes | None = None,
        **common,
    ) -> None:
        super().__init__(**common)
        if not arms:
            raise ValueError("FedSpine needs at least one (ratio, rank) arm")
        self.arms = list(arms)
        self.gamma, self.exploration, self.time_weight = gamma, exploration, time_weight
        self.state_path = Path(state_path) if state_path else None
        self.round_times = round_times
        self.run_dir = None
        self.bandits: dict[int, DiscountedUCB] = {}
        self.choices: list[dict] = []  # one per (round, node): arm, and its reward once known
        self._round = 0
        self._chosen: dict[int, int] = {}  # node -> arm index this round
        self._pending: dict[int, dict] = {}  # node -> its last reply, not yet rewarded
        if resume_from and Path(resume_from).is_file():
            self._load(Path(resume_from))

    @classmethod
    def from_config(cls, cfg, **common) -> FedSpine:
        f = cfg.fedspine
        return cls(
            arms=arm_grid(f.ratios, f.ranks),
            gamma=f.gamma,
            exploration=f.exploration,
            time_weight=f.time_weight,
            resume_from=f.state_file or None,
            **common,
        )

    # --- the bandit ------------------------------------------------------------------------
    def bandit(self, node_id: int) -> DiscountedUCB:
        if node_id not in self.bandits:
            self.bandits[node_id] = DiscountedUCB(len(self.arms), gamma=self.gamma, exploration=self.exploration, seed=self.seed + node_id % 100003)
        return self.bandits[node_id]

    def arm_of(self, node_id: int) -> Arm:
        if node_id not in self._chosen:
            self._chosen[node_id] = self.bandit(node_id).select()
            self.choices.append({"round": self._round, "node_id": node_id, **vars(self.arms[self._chosen[node_id]]), "reward": None})
        return self.arms[self._chosen[node_id]]

    def settle(self) -> None:
        """Reward every node's last reply with the round times known now."""
        by_round: dict[int, dict[int, float]] = {}
        for node_id, seen in sorted(self._pending.items()):
            own, median = self._times(node_id, seen, by_round)
            rnd = seen["round"]
            if own is None or not median:
                own = median = 1.0  # no timing: the reward is the loss improvement alone
                log(WARNING, "fedspine: no round time for node %d in round %d; reward from its loss alone", node_id, rnd)
            try:
                value = reward(loss_before=seen["loss_before"], loss_after=seen["loss_after"], round_time_s=own,
                               median_round_time_s=median, time_weight=self.time_weight)
            except ValueError as err:
                log(WARNING, "fedspine: node %d, round %d: no reward (%s)", node_id, rnd, err)
                continue
            self.bandit(node_id).update(seen["arm"], value)
            for c in reversed(self.choices):
                if c["round"] == rnd and c["node_id"] == node_id:
                    c.update(reward=value, round_time_s=own)
                    break
        self._pending.clear()
        self.save()

    def _times(self, node_id: int, seen: dict, by_round: dict[int, dict[int, float]]) -> tuple[float | None, float | None]:
        """(its round time, the round's median) of a pending reply: as measured now, or as
        a checkpoint stored them (the measurements of a round before a restart are gone)."""
        if "own" in seen:
            return seen["own"], seen["median"]
        rnd = seen["round"]
        if rnd not in by_round:
            by_round[rnd] = dict(self.round_times(rnd)) if self.round_times is not None else {}
        times = by_round[rnd]
        return times.get(node_id), (statistics.median(times.values()) if times else None)

    # --- LoRAStrategy hooks -------------------------------------------------------------
    def configure_train(self, server_round, arrays, config, grid):
        self.settle()
        self._round, self._chosen = server_round, {}
        messages = super().configure_train(server_round, arrays, config, grid)
        log(INFO, "fedspine round %d arms: %s", server_round, {n: self.arms[a].label() for n, a in sorted(self._chosen.items())})
        return messages

    def rank_of(self, node_id: int) -> int:
        return self.arm_of(node_id).rank

    def downlink(self, node_id: int, global_arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict]:
        extra = {
            keys.SYNC_MODE: keys.SYNC_DENSE,  # the weights change every round: dense each time
            keys.FROM_VERSION: self._round,
            keys.TO_VERSION: self._round,
            keys.PRUNE_RATIO: float(self.arm_of(node_id).ratio),
        }
        return global_arrays, extra

    def observe_reply(self, node_id: int, metrics) -> None:
        # the reward's losses: the model as the node received it (unpruned) and as it sends
        # it back, on the same batches. Not loss-start: a node that prunes before its first
        # step starts from a damaged model, and more damage would earn more
        before, after = metrics.get(keys.LOSS_REFERENCE), metrics.get(keys.LOSS_AFTER)
        if node_id in self._chosen and isinstance(before, (int, float)) and isinstance(after, (int, float)):
            self._pending[node_id] = {"round": self._round, "arm": self._chosen[node_id], "loss_before": float(before), "loss_after": float(after)}

    def aggregate_lora(self, updates: list[ClientLoRA], heads, global_arrays):
        weights, _ = split_global(global_arrays)
        new = {}
        for module, w in weights.items():
            pruned = []
            for u in updates:
                a, b = u.factors[module]
                rows, cols = u.kept[module] if u.kept else (None, None)
                pruned.append(PrunedUpdate(a=a, b=b, scaling=u.scaling, weight=u.num_examples, kept_rows=rows, kept_cols=cols))
            new[module] = (w + masked_average(pruned, tuple(w.shape))).astype(w.dtype)
        return join_global(new, weighted_mean(heads, [u.num_examples for u in updates]))

    # --- persistence -------------------------------------------------------------------------
    ARMS_COLUMNS = ("round", "node_id", "ratio", "rank", "reward", "round_time_s")

    def attach_run(self, run_dir, round_times: RoundTimes | None = None) -> None:
        self.run_dir = run_dir
        self.state_path = Path(run_dir.path) / "bandit_state.json"
        self.round_times = round_times

    def finish(self) -> None:
        """After the last round: reward the last replies, save the state and arms.csv."""
        self.settle()
        if self.run_dir is not None:
            self.run_dir.write_table("arms.csv", self.ARMS_COLUMNS, [{k: c.get(k) for k in self.ARMS_COLUMNS} for c in self.choices])

    def save(self) -> None:
        if self.state_path is None:
            return
        state = {
            "arms": [vars(a) for a in self.arms],
            "nodes": {str(n): b.to_dict() for n, b in self.bandits.items()},
            "choices": self.choices,
        }
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1, default=lambda x: None if isinstance(x, float) and math.isnan(x) else x))
        tmp.replace(self.state_path)

    def state_dict(self) -> dict:
        """The bandits, the choices so far, the round, and the replies still to reward with
        their round times as measured now (a resumed run has no measurements of them)."""
        by_round: dict[int, dict[int, float]] = {}
        pending = {}
        for node_id, seen in self._pending.items():
            own, median = self._times(node_id, seen, by_round)
            pending[node_id] = {**seen, "own": own, "median": median}
        bandits = {n: b.to_dict() for n, b in self.bandits.items()}
        return {**super().state_dict(), "bandits": bandits, "choices": list(self.choices), "pending": pending, "round": self._round}

    def load_state_dict(self, state, node) -> None:
        super().load_state_dict(state, node)
        self.bandits = {n: DiscountedUCB.from_dict(b) for n, b in by_node(state["bandits"], node).items()}
        self.choices = [renamed_row(c, node) for c in state["choices"]]
        self._pending = by_node(state["pending"], node)
        self._round = int(state["round"])

    def _load(self, path: Path) -> None:
        state = json.loads(path.read_text())
        arms = [Arm(float(a["ratio"]), int(a["rank"])) for a in state["arms"]]
        if arms != self.arms:
            raise ValueError(f"fedspine.state-file {path}: its arms {[a.label() for a in arms]} differ from this run's {[a.label() for a in self.arms]}")
        self.bandits = {int(n): DiscountedUCB.from_dict(b) for n, b in state["nodes"].items()}
        log(INFO, "fedspine: resumed the bandits of %d nodes from %s", len(self.bandits), path)
