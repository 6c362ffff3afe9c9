"""What the two strategy families need from the ServerApp, behind one small interface, so
that the run itself (server_app/app.py) is one path for both.

A family says:

- ``model``: the server's copy of the model, built from the config;
- ``metrics_columns``: metrics.csv's header (None: the LoRA default);
- :meth:`strategy`: the strategy, with each node's capacity read from its device profile
  (a LoRA rank, or a depth);
- :meth:`initial`: the global state round 1 starts from;
- :meth:`evaluation`: the server-side evaluation after every round.

The early-exit family is in server_app/early_exit.py. The ServerApp's ``main`` picks the
family, the one place it tells them apart.
"""

from __future__ import annotations

from logging import ERROR, INFO
from pathlib import Path

import numpy as np
import torch
from flwr.supercore import log

from stamen.config import StamenConfig
from strategies import STRATEGIES
from strategies.lora_records import join_global

from .evaluation import ServerEvaluation
from .profiles import leave_out, ranks_from_profiles


class Family:
    metrics_columns: tuple[str, ...] | None = None

    def __init__(self, cfg: StamenConfig, task) -> None:
        self.cfg, self.task = cfg, task

    def strategy(self, profiles: dict[int, dict]):
        raise NotImplementedError

    def initial(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def admit(self, algorithm, profiles: dict[int, dict]) -> None:
        """Give nodes that joined mid-run their capacity (a rank, a depth) in ``algorithm``."""
        raise NotImplementedError

    def evaluation(self, test, run, algorithm) -> ServerEvaluation:
        raise NotImplementedError

    def export(self, global_arrays: dict[str, np.ndarray], adapter: dict[str, np.ndarray], out, *, label_names) -> list:
        """Write the model of ``global_arrays`` under ``out`` as Hugging Face directories
        (ml/export.py); the directories written."""
        raise NotImplementedError

    def common(self) -> dict:
        """What every strategy takes from the config."""
        s = self.cfg.strategy
        return {"fraction_train": s.fraction_train, "min_nodes": s.min_nodes, "message_ttl": s.round_timeout, "bounds": self.cfg.robust}


class LoRAFamily(Family):
    """LoRA on a single-exit model: ranks from the profiles; the adapted weights and the
    head are the global state; central DP wraps the strategy where it is asked for."""

    def __init__(self, cfg: StamenConfig, task) -> None:
        from ml.model import target_module_names
        from ml.tasks import pick_device

        super().__init__(cfg, task)
        torch.manual_seed(cfg.train.seed)  # the head's initial weights, sent to every node
        self.model = task.load_model().to(pick_device())
        self.targets = target_module_names(self.model, cfg.lora.target_modules)

    def node_ranks(self, profiles) -> tuple[dict[int, int], dict[int, str]]:
        dim = min(min(self.model.get_submodule(t).weight.shape) for t in self.targets)  # a LoRA rank above it is no low rank
        return ranks_from_profiles(profiles, self.cfg.lora, max_rank=dim)

    def admit(self, algorithm, profiles):
        ranks, left_out = self.node_ranks(profiles)
        for node, rank in sorted(ranks.items()):
            log(INFO, "node %d joined: %s, LoRA rank %d", node, profiles[node].get("device-class"), rank)
        algorithm.node_ranks.update(ranks)
        leave_out(algorithm, left_out)

    def strategy(self, profiles):
        cfg = self.cfg
        node_ranks, left_out = self.node_ranks(profiles)
        for node, rank in sorted(node_ranks.items()):
            log(INFO, "node %d: %s, LoRA rank %d", node, profiles[node].get("device-class"), rank)
        try:
            algorithm = STRATEGIES[cfg.strategy.name].from_config(
                cfg, node_ranks=node_ranks, default_rank=cfg.lora.rank, lora_alpha=cfg.lora.alpha, seed=cfg.train.seed, **self.common()
            )
        except ValueError as err:  # e.g. fedit with mixed ranks
            log(ERROR, "strategy %s: %s", cfg.strategy.name, err)
            raise
        if cfg.dp.central:  # the server clips every node's update and noises the aggregate
            from strategies.central_dp import CentralDP

            algorithm = CentralDP(algorithm, noise_multiplier=cfg.dp.noise_multiplier, clipping_norm=cfg.dp.clipping_norm, delta=cfg.dp.delta)
        leave_out(algorithm, left_out)
        return algorithm

    def initial(self):
        from ml.model import adapted_weights, head_state

        return join_global(adapted_weights(self.model, self.targets), head_state(self.model))

    def evaluation(self, test, run, algorithm):
        return ServerEvaluation(self.cfg, self.task, self.model, test, run, algorithm)

    def export(self, global_arrays, adapter, out, *, label_names):
        """``model/`` (merged), and ``adapter/`` (+ ``base/``) where the strategy keeps a global adapter."""
        from ml.export import export_adapter, export_merged

        written = [export_merged(self.task, global_arrays, Path(out) / "model", label_names=label_names)]
        if adapter:
            written.append(export_adapter(self.task, global_arrays, adapter, Path(out), label_names=label_names) )
        return written
