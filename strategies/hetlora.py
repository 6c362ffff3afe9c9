"""HetLoRA: heterogeneous LoRA by truncation and zero-padding (Cho et al., EMNLP 2024).

The server keeps one global adapter of rank r_max. Node k receives its first r_k rank
components (the first r_k rows of A, the first r_k columns of B), trains them with a
tail-norm regulariser and may shrink its own rank (self-pruning). Aggregation pads every
client's factors with zeros back to r_max and averages them with weights proportional to
the size of each client's update, ||s_k B_k A_k||_F:

    w_k = ||s_k B_k A_k||_F / sum_j ||s_j B_j A_j||_F
    A = sum_k w_k pad(A_k),   B = sum_k w_k pad(B_k)

That is the paper's aggregation, ``hetlora.aggregation = "zero-pad"`` (the default): a
component only some clients hold is pulled toward zero by the others' padding. The
variant ``"renormalized"`` divides each component by the total weight of the clients that
hold it, so it is their weighted mean. It is not the paper's; the row norms of the two
differ by 1.12-3.03x in the LoRA study's heterogeneous setting (the figure of the audit in issue 15, not re-measured here).

In both, rank components nobody trained this round keep their previous global value (a
client that holds only the first r_k components says nothing about the others).

Scaling: every client uses the global adapter's scaling s = alpha / r_max (the server
sends node k alpha_k = alpha * r_k / r_max, so alpha_k / r_k = s), so that a truncation
is exactly a subset of the global adapter's components, and the global model is
W0 + s B A.

Self-pruning (client side): the regulariser gamma * ||(A_tail, B_tail)|| pushes the last
ceil(rho * r) components toward zero; after local training, if their norm is below
``threshold`` times the norm of the whole adapter, the client drops them and reports the
smaller rank (never below ``min_rank``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from stamen import keys
from stamen.lora_math import truncate

from .adapter import AdapterStrategy, initial_adapter
from .lora_records import ClientLoRA, Factors


def pad(a: np.ndarray, b: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad A (r, in) and B (out, r) to ``rank`` components."""
    r = a.shape[0]
    if r > rank:
        raise ValueError(f"cannot pad a rank-{r} adapter to the smaller rank {rank}")
    return np.pad(a, ((0, rank - r), (0, 0))), np.pad(b, ((0, 0), (0, rank - r)))


def norm_weights(updates: Sequence[ClientLoRA]) -> np.ndarray:
    """w_k proportional to ||s_k B_k A_k||_F over all modules (equal weights if all are zero)."""
    norms = np.array(
        [math.sqrt(sum(float(np.linalg.norm(u.scaling * (b @ a))) ** 2 for a, b in u.factors.values())) for u in updates]
    )
    if norms.sum() <= 0:
        return np.full(len(updates), 1.0 / len(updates))
    return norms / norms.sum()


AGGREGATIONS = ("zero-pad", "renormalized")


def aggregate(
    updates: Sequence[ClientLoRA], previous: Mapping[str, tuple[np.ndarray, np.ndarray]], *, mode: str = "zero-pad"
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Norm-weighted sum of the clients' zero-padded factors into the rank-r_max global
    adapter ``previous`` (``mode="zero-pad"``, the paper's), or each component divided by
    the weight of the clients holding it (``"renormalized"``); components no client holds
    keep their previous value."""
    if not updates:
        raise ValueError("hetlora aggregate needs at least one client update")
    if mode not in AGGREGATIONS:
        raise ValueError(f"hetlora aggregation {mode!r}: one of {', '.join(AGGREGATIONS)}")
    w = norm_weights(updates)
    out = {}
    for module, (a_prev, b_prev) in previous.items():
        r_max = a_prev.shape[0]
        a_new, b_new = np.zeros_like(a_prev, dtype=np.float64), np.zeros_like(b_prev, dtype=np.float64)
        covered = np.zeros(r_max, dtype=np.float64)  # total weight of the clients holding each component
        for k, u in enumerate(updates):
            if module not in u.factors:
                raise ValueError(f"client {k}: no factors for {module}")
            a, b = u.factors[module]
            r = a.shape[0]
            if r > r_max:
                raise ValueError(f"client {k}, {module}: rank {r} exceeds the global rank {r_max}")
            a_new[:r] += w[k] * a  # = adding the zero-padded factors, without building them
            b_new[:, :r] += w[k] * b
            covered[:r] += w[k]
        held = covered > 0
        if mode == "renormalized":  # the weighted mean over the clients holding each component
            a_new[held] /= covered[held, None]
            b_new[:, held] /= covered[None, held]
        a_new[~held], b_new[:, ~held] = a_prev[~held], b_prev[:, ~held]
        out[module] = (a_new.astype(a_prev.dtype), b_new.astype(b_prev.dtype))
    return out


class HetLoRA(AdapterStrategy):
    """A rank-r_max global adapter; node k trains its first r_k components."""

    accepts_pruned_ranks = True
    client_method = "hetlora"  # client_app/methods/hetlora.py: the tail penalty and self-pruning

    def __init__(
        self, *, tail_penalty: float = 1e-3, tail_fraction: float = 0.25, prune_threshold: float = 0.1,
        aggregation: str = "zero-pad", **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"hetlora aggregation {aggregation!r}: one of {', '.join(AGGREGATIONS)}")
        self.tail_penalty, self.tail_fraction, self.prune_threshold = tail_penalty, tail_fraction, prune_threshold
        self.aggregation = aggregation
        self.r_max = max([self.default_rank, *self.node_ranks.values()])

    @classmethod
    def from_config(cls, cfg, **common) -> HetLoRA:
        h = cfg.hetlora
        return cls(tail_penalty=h.tail_penalty, tail_fraction=h.tail_fraction, prune_threshold=h.prune_threshold,
                   aggregation=h.aggregation, **common)

    def initial_factors(self, node_id: int) -> Factors | None:
        if self.adapter is None:
            self.adapter = initial_adapter(self.module_shapes(), self.r_max, self.seed)
        return truncate(self.adapter, self.rank_of(node_id))

    def downlink(self, node_id: int, global_arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict]:
        arrays, extra = super().downlink(node_id, global_arrays)
        rank = self.rank_of(node_id)
        extra.update({
            keys.LORA_ALPHA: float(self.lora_alpha) * rank / self.r_max,  # alpha_k / r_k = alpha / r_max for all
            keys.TAIL_PENALTY: self.tail_penalty,
            keys.TAIL_FRACTION: self.tail_fraction,
            keys.PRUNE_THRESHOLD: self.prune_threshold,
        })
        return arrays, extra

    def combine(self, updates: list[ClientLoRA]) -> None:
        assert self.adapter is not None
        self.adapter = aggregate(updates, self.adapter, mode=self.aggregation)
        for u in updates:  # a node that pruned its rank keeps the smaller rank from now on
            rank = next(iter(u.factors.values()))[0].shape[0]
            if u.node_id >= 0 and rank < self.rank_of(u.node_id):
                self.node_ranks[u.node_id] = rank

    def adapter_scaling(self) -> float:
        return self.lora_alpha / self.r_max
