"""Aggregating LoRA updates from differently pruned models: the rule, as pure functions.

A device that pruned attention heads or MLP channels trains a smaller model: the
projections that produce a pruned unit lose its output rows (q/k/v, BERT's
intermediate.dense, Llama's gate/up) and the projections that consume it lose its input
columns (o, BERT's output.dense, Llama's down). Its LoRA factors have those smaller
shapes. The rule:

    every entry (i, j) of an adapted matrix's update is the weighted mean of
    B_k A_k [i, j] over the devices k that kept row i and column j;
    a unit a device pruned contributes nothing to it, not a zero.

An entry that no device kept stays unchanged (update 0). Weights are usually the number
of training examples. (Averaging zeros in instead would shrink the update of a unit by
the share of devices that pruned it.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PrunedUpdate:
    """One device's LoRA factors for one adapted matrix of full shape (out, in)."""

    a: np.ndarray  # (r, kept inputs)
    b: np.ndarray  # (kept outputs, r)
    scaling: float  # alpha / r of that device
    weight: float  # aggregation weight, e.g. number of examples
    kept_rows: np.ndarray | None = None  # indices of the full matrix's rows it kept; None = all
    kept_cols: np.ndarray | None = None  # indices of the columns it kept; None = all


def full_delta(update: PrunedUpdate, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(delta in full coordinates with zeros where pruned, 0/1 mask of the entries held)."""
    out_dim, in_dim = shape
    rows = np.arange(out_dim) if update.kept_rows is None else np.asarray(update.kept_rows)
    cols = np.arange(in_dim) if update.kept_cols is None else np.asarray(update.kept_cols)
    if update.b.shape[0] != len(rows) or update.a.shape[1] != len(cols) or update.a.shape[0] != update.b.shape[1]:
        raise ValueError(
            f"factors B {update.b.shape}, A {update.a.shape} do not fit {len(rows)} kept rows and {len(cols)} kept columns"
        )
    delta = np.zeros(shape, dtype=np.float64)
    mask = np.zeros(shape, dtype=np.float64)
    delta[np.ix_(rows, cols)] = update.scaling * (update.b.astype(np.float64) @ update.a.astype(np.float64))
    mask[np.ix_(rows, cols)] = 1.0
    return delta, mask


def masked_average(updates: Sequence[PrunedUpdate], shape: tuple[int, int]) -> np.ndarray:
    """The aggregated update of one matrix under the rule in this module's docstring."""
    numerator = np.zeros(shape, dtype=np.float64)
    denominator = np.zeros(shape, dtype=np.float64)
    for u in updates:
        delta, mask = full_delta(u, shape)
        numerator += u.weight * delta
        denominator += u.weight * mask
    out = np.zeros(shape, dtype=np.float64)
    held = denominator > 0
    out[held] = numerator[held] / denominator[held]
    return out
