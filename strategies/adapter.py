"""Base for the strategies that keep a global adapter on a frozen base model (FedIT,
HetLoRA, FlexLoRA), as opposed to FLoRA, which merges every round into the weights.

The base weights W0 never change, so a node downloads them once (dense) and then only
the head (``sync-mode = current``). With them, each node receives the adapter it
starts from this round, under ``init.<module>.lora_A`` / ``init.<module>.lora_B``
(the client loads it into its LoRA instead of a fresh one). A subclass says what that
adapter is (:meth:`initial_factors`), how replies combine (:meth:`combine`), and what the
global adapter adds to W0 (:meth:`delta`); the global arrays this class returns, which
the server evaluates and checkpoints, are W0 + delta.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from stamen import keys

from .base import LoRAStrategy
from .lora_records import ClientLoRA, Factors, join_global, split_global, weighted_mean


def init_arrays(factors: Factors) -> dict[str, np.ndarray]:
    """The downlink form of a starting adapter."""
    out = {}
    for module, (a, b) in factors.items():
        out[keys.INIT_PREFIX + module + keys.LORA_A] = a
        out[keys.INIT_PREFIX + module + keys.LORA_B] = b
    return out


def initial_adapter(shapes: dict[str, tuple[int, int]], rank: int, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A shared starting adapter, as peft initialises one: A ~ U(-1/sqrt(in), 1/sqrt(in))
    (kaiming-uniform with a = sqrt(5)), B = 0, so the model starts as W0."""
    rng = np.random.default_rng(seed)
    out = {}
    for module, (out_dim, in_dim) in sorted(shapes.items()):
        bound = 1.0 / np.sqrt(in_dim)
        out[module] = (rng.uniform(-bound, bound, size=(rank, in_dim)).astype(np.float32), np.zeros((out_dim, rank), np.float32))
    return out


class AdapterStrategy(LoRAStrategy):
    """A global adapter on frozen base weights; see the module docstring."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.base: dict[str, np.ndarray] | None = None  # W0, captured on the first round
        self._synced: set[int] = set()  # nodes that hold W0

    # --- for subclasses --------------------------------------------------------------
    def initial_factors(self, node_id: int) -> Factors | None:
        """The adapter node ``node_id`` starts from (rank = its rank); None: a fresh LoRA."""
        raise NotImplementedError

    def combine(self, updates: list[ClientLoRA]) -> None:
        """Fold this round's checked updates into the global adapter."""
        raise NotImplementedError

    def delta(self) -> dict[str, np.ndarray]:
        """What the global adapter adds to each base matrix ({} before the first round);
        by default ``s B A`` of the factors in :attr:`adapter`."""
        s = self.adapter_scaling()
        return {m: s * (b @ a) for m, (a, b) in (self.adapter or {}).items()}

    # FedIT and HetLoRA keep the global adapter as factors, with one scaling
    adapter: Factors | None = None

    def adapter_scaling(self) -> float:
        """s of the global adapter's product ``s B A``, where the strategy keeps :attr:`adapter`."""
        raise NotImplementedError

    def global_adapter(self) -> Factors | None:
        s = self.adapter_scaling()
        return {m: (a, s * b) for m, (a, b) in self.adapter.items()} if self.adapter else None

    # --- LoRAStrategy hooks ------------------------------------------------------------
    def module_shapes(self) -> dict[str, tuple[int, int]]:
        assert self.base is not None
        return {m: tuple(w.shape) for m, w in self.base.items()}

    def downlink(self, node_id: int, global_arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict]:
        weights, head = split_global(global_arrays)
        if self.base is None:  # round 1: the global weights are still W0
            self.base = {m: w.copy() for m, w in weights.items()}
        if node_id in self._synced:
            arrays, mode = dict(head), keys.SYNC_CURRENT
        else:
            arrays, mode = join_global(self.base, head), keys.SYNC_DENSE
            if node_id not in self.stateless:
                self._synced.add(node_id)
        start = self.initial_factors(node_id)
        if start is not None:
            arrays.update(init_arrays(start))
        return arrays, {keys.SYNC_MODE: mode, keys.FROM_VERSION: 0, keys.TO_VERSION: 0}

    def forget_node(self, node_id: int) -> None:
        self._synced.discard(node_id)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "base": self.base, "adapter": self.adapter}

    def load_state_dict(self, state, node) -> None:
        """W0 and the adapter come back; no node holds W0 in a new run (its first downlink is dense)."""
        super().load_state_dict(state, node)
        self.base, self.adapter, self._synced = state["base"], state["adapter"], set()

    def zero_update(self, node_id: int) -> tuple[ClientLoRA, dict[str, np.ndarray]]:
        """A node that changes nothing sends back the adapter it started from."""
        zero, head = super().zero_update(node_id)
        start = self.initial_factors(node_id)
        if start is None:  # a fresh LoRA: product 0
            return zero, head
        return dataclasses.replace(zero, factors=dict(start), scaling=self.lora_alpha / self.rank_of(node_id)), head

    def aggregate_lora(
        self, updates: list[ClientLoRA], heads: list[dict[str, np.ndarray]], global_arrays: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        assert self.base is not None, "configure_train runs before aggregate_train"
        self.combine(updates)
        return self.global_arrays(weighted_mean(heads, [u.num_examples for u in updates]))

    def global_arrays(self, head: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """W0 + the global adapter's delta, with ``head``: what the server keeps."""
        assert self.base is not None
        delta = self.delta()
        merged = {m: (w + delta[m]).astype(w.dtype) if m in delta else w for m, w in self.base.items()}
        return join_global(merged, head)
