"""FedIT: federated instruction tuning by FedAvg of the LoRA factors (Zhang et al., ICASSP
2024), the "noisy" baseline of heterogeneous-LoRA work.

Every client holds an adapter of the same rank r (and scaling s = alpha / r). The server
averages the A factors and the B factors separately, weighted by num-examples:

    A = sum_k p_k A_k,   B = sum_k p_k B_k,     p_k = n_k / sum_j n_j

and clients continue training that adapter next round. The model it implies, s B A, is
not the average of the clients' models s B_k A_k: the product of averages has cross
terms p_j p_k B_j A_k (j != k) that no client trained. FLoRA's stacking has none
(tests/test_lora_baselines_math.py shows both numerically).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .adapter import AdapterStrategy, initial_adapter
from .lora_records import ClientLoRA, Factors, split_global


def average_factors(updates: Sequence[ClientLoRA]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Num-examples weighted mean of A and of B, per module; all ranks must be equal."""
    if not updates:
        raise ValueError("average_factors needs at least one client update")
    total = float(sum(u.num_examples for u in updates))
    if total <= 0:
        raise ValueError("average_factors: the clients' num_examples sum to zero")
    out = {}
    for module, (a0, b0) in updates[0].factors.items():
        a_sum, b_sum = np.zeros_like(a0, dtype=np.float64), np.zeros_like(b0, dtype=np.float64)
        for k, u in enumerate(updates):
            if module not in u.factors:
                raise ValueError(f"client {k}: no factors for {module}")
            a, b = u.factors[module]
            if a.shape != a0.shape or b.shape != b0.shape:
                raise ValueError(
                    f"client {k}, {module}: A {a.shape}, B {b.shape} differ from client 0's A {a0.shape}, B {b0.shape}; "
                    "FedIT needs one rank for all clients (use hetlora, flexlora or flora for mixed ranks)"
                )
            p = u.num_examples / total
            a_sum += p * a
            b_sum += p * b
        out[module] = (a_sum.astype(a0.dtype), b_sum.astype(b0.dtype))
    return out


class FedIT(AdapterStrategy):
    """FedAvg of A and of B; every node continues from the averaged adapter."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        ranks = sorted(set(self.node_ranks.values()) | {self.default_rank})
        if len(ranks) > 1:
            raise ValueError(
                f"fedit needs one LoRA rank for every node, got ranks {ranks} "
                "(set lora.rank and drop lora-rank/rank-by-class overrides, or use flora, hetlora or flexlora)"
            )
        self.rank = ranks[0]

    def initial_factors(self, node_id: int) -> Factors | None:
        if self.adapter is None:  # one shared start, so that round 1's averages mean something
            self.adapter = initial_adapter(self.module_shapes(), self.rank, self.seed)
        return self.adapter

    def combine(self, updates: list[ClientLoRA]) -> None:
        self.adapter = average_factors(updates)

    def adapter_scaling(self) -> float:
        return self.lora_alpha / self.rank

    central_dp_space = "factors"  # the global adapter is the mean of the nodes' factors

    def noise_release(self, new_global: dict[str, np.ndarray], noise) -> dict[str, np.ndarray]:
        """What the nodes receive is the global adapter (and the head): noise those; the
        weights the server keeps are W0 + the noised adapter's product."""
        assert self.adapter is not None
        self.adapter = {m: (noise(a), noise(b)) for m, (a, b) in self.adapter.items()}
        _, head = split_global(new_global)
        return self.global_arrays({k: noise(v) for k, v in head.items()})
