"""Bringing a node's copy of the global weights up to date from a train instruction.

The node keeps the merged global weights of the adapted modules in ``context.state``
(the SuperNode keeps it across the rounds of a run). See strategies/flora.py for the
three forms the downlink takes.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from stamen import keys
from stamen.lora_math import merge_stacked
from stamen.records import split_global


def keeps_global(transport_name: str, in_simulation: bool = False) -> bool:
    """Whether a node keeps the global weights between rounds. Not in Flower's simulation
    engine unless ``in_simulation`` (``simulation.keep-global``): there the SuperLink holds
    every virtual node's ``context.state`` in one process, and 1,000 copies of the model's
    adapted weights would not fit (7 MB each for MiniLM). Such a node says so in its
    profile (``keys.KEEPS_GLOBAL``) and the server sends it the dense weights every round,
    as it does to any node that missed a round."""
    return transport_name != "simulation" or in_simulation


class OutOfSync(RuntimeError):
    """The instruction assumes global weights this node does not hold."""


def apply_downlink(
    held: Mapping[str, np.ndarray] | None,
    held_version: int,
    arrays: Mapping[str, np.ndarray],
    *,
    mode: str,
    from_version: int,
    to_version: int,
) -> dict[str, np.ndarray]:
    """Return the global adapted weights at ``to_version`` ({module: W})."""
    if mode == keys.SYNC_DENSE:
        return split_global(arrays)[0]
    if mode == keys.SYNC_CURRENT:
        if held is None or held_version != to_version:
            raise OutOfSync(f"server assumed version {to_version}, node holds {held_version}")
        return dict(held)
    if mode == keys.SYNC_STACKED:
        if held is None or held_version != from_version:
            raise OutOfSync(f"stacked delta from version {from_version}, node holds {held_version}")
        stacked = {
            k.removesuffix(keys.LORA_A): (v, arrays[k.removesuffix(keys.LORA_A) + keys.LORA_B])
            for k, v in arrays.items()
            if k.endswith(keys.LORA_A)
        }
        return merge_stacked(held, stacked)
    raise ValueError(f"unknown sync mode {mode!r}")
