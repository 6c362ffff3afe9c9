"""The arrays of one transfer, made the same on both sides from (node, round, direction),
so the receiver can check them; and the two encodings compared."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord

from stamen.pack import pack, unpack

DOWN, UP = 0, 1


def load_spec(path: str) -> dict[str, list]:
    spec = json.loads(Path(path).read_text())
    if set(spec) != {"down", "up"}:
        raise ValueError(f"{path}: expected keys 'down' and 'up', got {sorted(spec)}")
    return spec


def make(entries: list, node_id: int, server_round: int, direction: int) -> dict[str, np.ndarray]:
    """Distinct per node and round: Flower's object store is content-addressed, and a
    node pushing bytes the SuperLink already holds would skip them."""
    rng = np.random.default_rng([node_id % 2**32, server_round, direction])
    out = {}
    for name, shape, dtype in entries:
        dtype = np.dtype(dtype)
        if dtype.kind == "f":
            out[name] = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
        else:
            out[name] = rng.integers(0, 1000, shape).astype(dtype)
    return out


def encode(arrays: dict[str, np.ndarray], packed: bool) -> ArrayRecord:
    return pack(arrays) if packed else ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in arrays.items()})


def decode(record: ArrayRecord, packed: bool) -> dict[str, np.ndarray]:
    return unpack(record) if packed else {k: v.numpy() for k, v in record.items()}


def intact(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> bool:
    return list(got) == list(want) and all(
        got[k].dtype == want[k].dtype and got[k].shape == want[k].shape and np.array_equal(got[k], want[k]) for k in want
    )
