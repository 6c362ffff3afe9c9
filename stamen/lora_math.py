"""The LoRA math both sides run, so that the device never imports server code.

- :func:`merge_stacked`: W + B_stack A_stack. The server merges FLoRA's stacked adapter
  into the global weights; a node that holds the previous weights does the same with the
  stacked downlink (client_app/sync.py).
- :func:`tail_size`, :func:`self_prune_rank`, :func:`truncate`: HetLoRA's tail. The node
  regularises and self-prunes it; the server sizes and pads with the same rule.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from .records import Factors


def merge_stacked(weights: Mapping[str, np.ndarray], stacked: Factors) -> dict[str, np.ndarray]:
    """W + B_stack @ A_stack for every adapted module (the others are returned unchanged)."""
    merged = dict(weights)
    for module, (a, b) in stacked.items():
        if module not in weights:
            raise ValueError(f"{module}: not an adapted module of the global model")
        w = weights[module]
        if w.shape != (b.shape[0], a.shape[1]):
            raise ValueError(f"{module}: weight {w.shape} does not match B@A {(b.shape[0], a.shape[1])}")
        merged[module] = (w + b @ a).astype(w.dtype)
    return merged


def truncate(factors: Factors, rank: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The first ``rank`` components of every module's adapter."""
    out = {}
    for m, (a, b) in factors.items():
        if rank < 1 or rank > a.shape[0]:
            raise ValueError(f"{m}: cannot truncate a rank-{a.shape[0]} adapter to rank {rank}")
        out[m] = (a[:rank].copy(), b[:, :rank].copy())
    return out


def tail_size(rank: int, rho: float) -> int:
    """HetLoRA's tail of a rank-``rank`` adapter: the last ceil(rho * rank) components
    (none of a rank-1 adapter)."""
    return max(1, math.ceil(rho * rank)) if rank > 1 else 0


def self_prune_rank(factors: Factors, *, rho: float, threshold: float, min_rank: int = 1) -> int:
    """The rank a client keeps after local training: drop the tail ceil(rho * r) components
    when their norm is below ``threshold`` x the norm of the whole adapter."""
    rank = next(iter(factors.values()))[0].shape[0]
    tail = tail_size(rank, rho)
    if tail == 0 or rank - tail < min_rank:
        return rank
    total = sum(float(np.sum(a**2) + np.sum(b**2)) for a, b in factors.values())
    tail_norm = sum(float(np.sum(a[-tail:] ** 2) + np.sum(b[:, -tail:] ** 2)) for a, b in factors.values())
    return rank - tail if total > 0 and math.sqrt(tail_norm) < threshold * math.sqrt(total) else rank
