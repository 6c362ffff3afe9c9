"""Arrays as Flower records, the one codec both sides use: a packed record each way
(stamen/pack.py), and the names the global state and LoRA factors travel under.

The ground floor: numpy, Flower's record types and the message keys, nothing of either
side. The server's check of a reply (shapes, ranks, finiteness) builds on this in
strategies/lora_records.py.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import ArrayRecord

from . import keys
from .pack import MalformedRecord, pack, unpack

Factors = Mapping[str, tuple[np.ndarray, np.ndarray]]  # module -> (A (r, in), B (out, r))


class InvalidUpdate(ValueError):
    """A record that cannot be used (a client update the server cannot aggregate, a
    malformed pack); the message says why."""


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Arrays -> a packed record: a few Flower objects, whatever their number (stamen/pack.py)."""
    return pack(arrays)


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """A packed record -> read-only arrays; a malformed pack is an :class:`InvalidUpdate`."""
    try:
        return unpack(record)
    except MalformedRecord as err:
        raise InvalidUpdate(f"malformed pack: {err}") from None


def factors_to_arrays(factors: Factors) -> dict[str, np.ndarray]:
    out = {}
    for module, (a, b) in factors.items():
        out[module + keys.LORA_A] = a
        out[module + keys.LORA_B] = b
    return out


def init_factors(arrays: Mapping[str, np.ndarray]) -> Factors:
    """The adapter a downlink carries (``init.<module>.lora_A/B``), by module; empty for a
    fresh LoRA. The server records what it sent with it, the node what it starts from."""
    init = {k[len(keys.INIT_PREFIX):]: v for k, v in arrays.items() if k.startswith(keys.INIT_PREFIX)}
    modules = sorted(k.removesuffix(keys.LORA_A) for k in init if k.endswith(keys.LORA_A))
    return {m: (init[m + keys.LORA_A], init[m + keys.LORA_B]) for m in modules if m + keys.LORA_B in init}


def split_global(arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Global state -> ({module: merged weight}, {head.*: tensor})."""
    weights = {k.removesuffix(".weight"): v for k, v in arrays.items() if not k.startswith(keys.HEAD_PREFIX)}
    head = {k: v for k, v in arrays.items() if k.startswith(keys.HEAD_PREFIX)}
    return weights, head


def join_global(weights: Mapping[str, np.ndarray], head: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {**{f"{m}.weight": w for m, w in weights.items()}, **head}
