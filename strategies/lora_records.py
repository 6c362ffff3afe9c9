"""A client's LoRA reply as the server sees it: decoded with the shared codec
(stamen/records.py) and checked.

A reply is checked against what the server asked for (the modules, their shapes, the
node's rank). Anything else is an :class:`InvalidUpdate` with a reason that names the
problem, so one bad client is dropped with a clear log line instead of breaking the round.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import RecordDict

from stamen import keys
from stamen.records import Factors, InvalidUpdate, factors_to_arrays, from_record, init_factors, join_global, split_global, to_record

__all__ = [  # the codec, from the ground floor, for the strategies that import it from here
    "ClientLoRA", "Factors", "InvalidUpdate", "factors_to_arrays", "from_record", "init_factors", "join_global", "parse_reply",
    "split_global", "to_record", "weighted_mean",
]


@dataclass(frozen=True)
class ClientLoRA:
    """One client's trained adapter and its aggregation weight inputs."""

    factors: Factors
    num_examples: float  # the aggregation weight: the node's claim, as bounded by strategies/bounds.py
    scaling: float  # s_k = alpha_k / r_k
    node_id: int = -1  # who sent it (-1: unknown, e.g. in unit tests)
    kept: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None  # pruned: module -> (rows, cols) kept


def parse_reply(
    content: RecordDict,
    *,
    module_shapes: Mapping[str, tuple[int, int]],
    head_shapes: Mapping[str, tuple[int, ...]],
    rank: int,
    allow_smaller_rank: bool = False,
    allow_pruned: bool = False,
) -> tuple[ClientLoRA, dict[str, np.ndarray]]:
    """Decode and check one train reply; raise InvalidUpdate naming what is wrong.

    ``allow_smaller_rank``: the node may have pruned its rank (HetLoRA); the reply's
    ``lora-rank`` metric says which rank, at most ``rank``. ``allow_pruned``: the node
    pruned heads / channels (FedSpine); for every module the reply carries
    ``kept.<module>.rows`` and ``.cols`` (the unpruned indices it kept, increasing) and
    factors of the kept shape."""
    if keys.ARRAYS not in content.array_records:
        raise InvalidUpdate(f"no ArrayRecord '{keys.ARRAYS}' in the reply")
    if keys.METRICS not in content.metric_records:
        raise InvalidUpdate(f"no MetricRecord '{keys.METRICS}' in the reply")
    metrics = content.metric_records[keys.METRICS]
    num_examples = metrics.get(keys.NUM_EXAMPLES)
    if not isinstance(num_examples, (int, float)) or not num_examples > 0:
        raise InvalidUpdate(f"metric '{keys.NUM_EXAMPLES}' missing or not positive: {num_examples!r}")
    alpha = metrics.get(keys.LORA_ALPHA)
    if not isinstance(alpha, (int, float)) or not np.isfinite(alpha) or alpha <= 0:
        raise InvalidUpdate(f"metric '{keys.LORA_ALPHA}' missing or not positive: {alpha!r}")

    # The rank that sets the scaling s = alpha / r: the assigned one, or (HetLoRA) the one
    # the node pruned to; the factors' shapes must agree with it below. A metric that
    # disagrees with the assignment is refused, so no one can read another scaling from it.
    reported = metrics.get(keys.LORA_RANK)
    if not isinstance(reported, int) or isinstance(reported, bool):
        raise InvalidUpdate(f"metric '{keys.LORA_RANK}' = {reported!r}: must be an integer")
    if allow_smaller_rank and not 1 <= reported <= rank:
        raise InvalidUpdate(f"metric '{keys.LORA_RANK}' = {reported}: must be in 1..{rank}, the rank this node was assigned")
    if not allow_smaller_rank and reported != rank:
        raise InvalidUpdate(f"metric '{keys.LORA_RANK}' = {reported}, but this node was assigned rank {rank}")
    rank = reported
    arrays = from_record(content.array_records[keys.ARRAYS])
    expected = {m + s for m in module_shapes for s in (keys.LORA_A, keys.LORA_B)} | set(head_shapes)
    if allow_pruned:
        expected |= {keys.KEPT_PREFIX + m + s for m in module_shapes for s in (keys.KEPT_ROWS, keys.KEPT_COLS)}
    missing, extra = sorted(expected - set(arrays)), sorted(set(arrays) - expected)
    if missing:
        raise InvalidUpdate(f"missing keys: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    if extra:
        raise InvalidUpdate(f"unexpected keys: {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}")

    factors, kept = {}, {}
    for module, (out_dim, in_dim) in module_shapes.items():
        a, b = arrays[module + keys.LORA_A], arrays[module + keys.LORA_B]
        if allow_pruned:
            rows = _indices(arrays, keys.KEPT_PREFIX + module + keys.KEPT_ROWS, out_dim)
            cols = _indices(arrays, keys.KEPT_PREFIX + module + keys.KEPT_COLS, in_dim)
            kept[module] = (rows, cols)
            out_dim, in_dim = len(rows), len(cols)
        if a.shape != (rank, in_dim) or b.shape != (out_dim, rank):
            raise InvalidUpdate(
                f"{module}: got A {a.shape}, B {b.shape}; expected A {(rank, in_dim)}, B {(out_dim, rank)} (rank {rank})"
            )
        factors[module] = (a, b)
    head = {k: arrays[k] for k in head_shapes}
    for k, v in head.items():
        if v.shape != tuple(head_shapes[k]):
            raise InvalidUpdate(f"{k}: got shape {v.shape}, expected {tuple(head_shapes[k])}")
    for k, v in arrays.items():
        if not np.all(np.isfinite(v)):
            raise InvalidUpdate(f"{k}: non-finite values")
    return ClientLoRA(factors, int(num_examples), float(alpha) / rank, kept=kept or None), head


def _indices(arrays: Mapping[str, np.ndarray], key: str, size: int) -> np.ndarray:
    """Kept indices: a non-empty, strictly increasing integer vector within [0, size)."""
    v = arrays[key]
    if v.ndim != 1 or v.dtype.kind not in "iu" or len(v) == 0:
        raise InvalidUpdate(f"{key}: must be a non-empty integer vector, got {v.dtype} {v.shape}")
    if v[0] < 0 or v[-1] >= size or np.any(np.diff(v) <= 0):
        raise InvalidUpdate(f"{key}: indices must increase strictly within [0, {size})")
    return v.astype(np.int64)


def weighted_mean(states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """Per-key weighted average (FedAvg) of same-shaped tensors."""
    if not states:
        return {}
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    return {
        k: sum(wi * s[k].astype(np.float64) for wi, s in zip(w, states, strict=True)).astype(states[0][k].dtype)
        for k in states[0]
    }
