"""FLoRA: heterogeneous-rank LoRA aggregation by stacking (Wang et al., NeurIPS 2024).

Round t, with participants k = 1..K, each holding a fresh LoRA of its own rank r_k
(A_k: r_k x in, B_k: out x r_k, scaling s_k = alpha_k / r_k) trained on the global model:

    p_k     = n_k / sum_j n_j                      (num-examples share of this round)
    A_stack = [p_1 s_1 A_1; ...; p_K s_K A_K]      (rows,    (sum_k r_k) x in)
    B_stack = [B_1, ..., B_K]                       (columns, out x (sum_k r_k))
    B_stack @ A_stack = sum_k p_k s_k B_k A_k       (exactly: no cross terms)

The scalings s_k are folded into A's rows, so the stacked adapter has scaling 1 and a
global rank of sum_k r_k (whoever took part this round). It is merged into the global
weights, W_t = W_{t-1} + B_stack A_stack, and every client starts a fresh LoRA next round.

What travels down (per node, chosen by bytes): a node that holds W_{t-1} (it took part in
the previous round's downlink) receives the stacked adapter, (sum r_k)(in + out) numbers
per module, and merges it itself; any other node receives the dense merged weights W_t,
in x out per module. For all-MiniLM-L6-v2 (query/value of 6 layers, 384 x 384) and ranks
4+8+8+16 = 36, that is 1.33 MB stacked against 7.08 MB dense; the dense form is used
whenever it is smaller (sum r_k > in*out/(in+out) = 192 here).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from stamen import keys
from stamen.lora_math import merge_stacked

from .base import LoRAStrategy
from .lora_records import ClientLoRA, Factors, factors_to_arrays, join_global, split_global, weighted_mean


def stack_lora(updates: Sequence[ClientLoRA]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Stack the clients' factors so that B_stack @ A_stack = sum_k p_k s_k B_k A_k.

    Raises ValueError naming the client and module when keys or shapes disagree.
    """
    if not updates:
        raise ValueError("stack_lora needs at least one client update")
    modules = list(updates[0].factors)
    total = float(sum(u.num_examples for u in updates))
    if total <= 0:
        raise ValueError("stack_lora: the clients' num_examples sum to zero")
    for k, update in enumerate(updates):
        if set(update.factors) != set(modules):
            diff = sorted(set(update.factors) ^ set(modules))
            raise ValueError(f"client {k}: modules differ from client 0's ({', '.join(diff[:3])})")
    stacked = {}
    for module in modules:
        a_parts, b_parts = [], []
        for k, update in enumerate(updates):
            a, b = update.factors[module]
            a0, b0 = updates[0].factors[module]
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                raise ValueError(f"client {k}, {module}: A {a.shape} and B {b.shape} are not LoRA factors")
            if a.shape[1] != a0.shape[1] or b.shape[0] != b0.shape[0]:
                raise ValueError(
                    f"client {k}, {module}: in/out dims {a.shape[1]}/{b.shape[0]} differ from "
                    f"client 0's {a0.shape[1]}/{b0.shape[0]}"
                )
            p_k = update.num_examples / total
            a_parts.append((p_k * update.scaling) * a)
            b_parts.append(b)
        stacked[module] = (np.concatenate(a_parts, axis=0), np.concatenate(b_parts, axis=1))
    return stacked


def stacked_bytes(stacked: Factors) -> int:
    return sum(a.nbytes + b.nbytes for a, b in stacked.values())


class FLoRA(LoRAStrategy):
    """Stacking aggregation; merged into the base weights; fresh client LoRA every round."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.version = 0  # number of rounds merged into the global weights
        self._last_stack: dict[str, tuple[np.ndarray, np.ndarray]] | None = None  # version-1 -> version
        self._node_version: dict[int, int] = {}

    def downlink(self, node_id: int, global_arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict]:
        held = -1 if node_id in self.stateless else self._node_version.get(node_id, -1)
        weights, head = split_global(global_arrays)
        if held == self.version:
            arrays, mode = dict(head), keys.SYNC_CURRENT
        elif (
            held == self.version - 1
            and self._last_stack is not None
            and stacked_bytes(self._last_stack) < sum(w.nbytes for w in weights.values())
        ):
            arrays, mode = {**factors_to_arrays(self._last_stack), **head}, keys.SYNC_STACKED
        else:
            arrays, mode = dict(global_arrays), keys.SYNC_DENSE
        self._node_version[node_id] = self.version
        return arrays, {keys.SYNC_MODE: mode, keys.FROM_VERSION: held, keys.TO_VERSION: self.version}

    def forget_node(self, node_id: int) -> None:
        self._node_version.pop(node_id, None)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "version": self.version}

    def load_state_dict(self, state, node) -> None:
        """No node holds a version of a new run: every node's next downlink is dense."""
        super().load_state_dict(state, node)
        self.version, self._last_stack, self._node_version = int(state["version"]), None, {}

    central_dp_space = "product"  # the merge adds the mean of the nodes' s_k B_k A_k

    def noise_release(self, new_global: dict[str, np.ndarray], noise) -> dict[str, np.ndarray]:
        """The released weights are the dense merged ones; the noise is not in the stacked
        factors, so next round every node gets dense weights."""
        self._last_stack = None
        return {k: noise(v) for k, v in new_global.items()}

    def aggregate_lora(
        self, updates: list[ClientLoRA], heads: list[dict[str, np.ndarray]], global_arrays: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        stacked = stack_lora(updates)
        weights, _ = split_global(global_arrays)
        new_head = weighted_mean(heads, [u.num_examples for u in updates])
        self._last_stack = stacked
        self.version += 1
        return join_global(merge_stacked(weights, stacked), new_head)
