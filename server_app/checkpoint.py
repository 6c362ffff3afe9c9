"""Per-round checkpoints of a run: ``runs/<run-id>/checkpoints/round-<NNNNN>/``.

After every round (its evaluation and its metrics.csv row written) the ServerApp saves
everything the run needs to continue from that round:

* ``arrays.npz``: the global weights (``global/<name>``), the arrays of the strategy's
  state (``state/<n>``) and, for the strategies that keep a global adapter, that adapter
  (``adapter/<module>.lora_A|B``, what ``stamen export --format adapter`` writes);
* ``checkpoint.json``: the round, the strategy's and the wrappers' state
  (``state_dict()`` of each; arrays referenced by name), the server's RNG states, the
  node -> partition map, the best round so far, and the resolved configuration.

A checkpoint is written into a hidden ``.round-<NNNNN>.partial`` directory, every file
fsynced, then renamed into place: a process killed while it writes leaves the previous
checkpoints as they were and a partial directory that is never read (and is removed by the
next save). The last ``checkpoint.keep`` checkpoints are kept, and the best round's.

The state codec (:func:`encode` / :func:`decode`) is written by hand: JSON cannot hold
arrays, tuples or integer keys, and pickle would execute whatever a run directory holds.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT, VERSION = "stamen-checkpoint", 1
DIRECTORY = "checkpoints"
_NAME = re.compile(r"^round-(\d{5,})$")


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was asked for; the message says where and why."""


# --- the state codec: plain data with arrays, tuples and int keys <-> JSON + arrays ---------
def encode(obj: Any, arrays: dict[str, np.ndarray]) -> Any:
    """``obj`` as JSON-able data; every array goes into ``arrays`` under a fresh name."""
    if isinstance(obj, np.ndarray):
        name = f"state/{len(arrays)}"
        arrays[name] = obj
        return {"__array__": name}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(x, arrays) for x in obj]}
    if isinstance(obj, list):
        return [encode(x, arrays) for x in obj]
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode(v, arrays) for k, v in obj.items()}
        return {"__items__": [[encode(k, arrays), encode(v, arrays)] for k, v in obj.items()]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint state: cannot store a {type(obj).__name__} ({obj!r:.80})")


def decode(data: Any, arrays: Mapping[str, np.ndarray]) -> Any:
    """The inverse of :func:`encode`."""
    if isinstance(data, list):
        return [decode(x, arrays) for x in data]
    if isinstance(data, dict):
        if "__array__" in data:
            return np.array(arrays[data["__array__"]])
        if "__tuple__" in data:
            return tuple(decode(x, arrays) for x in data["__tuple__"])
        if "__items__" in data:
            return {_hashable(decode(k, arrays)): decode(v, arrays) for k, v in data["__items__"]}
        return {k: decode(v, arrays) for k, v in data.items()}
    return data


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


# --- one checkpoint --------------------------------------------------------------------------
@dataclass
class Checkpoint:
    """What :func:`read` gives back."""

    path: Path
    server_round: int
    state: dict[str, Any]  # decoded: strategy, measurements, evaluation, rng, nodes, ...
    global_arrays: dict[str, np.ndarray]
    adapter: dict[str, np.ndarray]  # {} unless the strategy keeps a global adapter


def write(
    run_path: Path,
    server_round: int,
    *,
    state: Mapping[str, Any],
    global_arrays: Mapping[str, np.ndarray],
    adapter: Mapping[str, np.ndarray] | None = None,
    keep: int = 2,
    also_keep: int | None = None,
) -> Path:
    """Save round ``server_round``'s checkpoint atomically, then remove all but the last
    ``keep`` ones and ``also_keep`` (the best round). Returns its directory."""
    if keep < 1:
        raise ValueError(f"checkpoint.keep must be at least 1, got {keep}")
    root = Path(run_path) / DIRECTORY
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"round-{server_round:05d}"
    tmp = root / f".{final.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    arrays: dict[str, np.ndarray] = {f"global/{k}": np.asarray(v) for k, v in global_arrays.items()}
    arrays.update({f"adapter/{k}": np.asarray(v) for k, v in (adapter or {}).items()})
    meta = {"format": FORMAT, "version": VERSION, "round": server_round, "state": encode(dict(state), arrays)}
    with open(tmp / "arrays.npz", "wb") as f:
        np.savez(f, **arrays)
        _sync(f)
    with open(tmp / "checkpoint.json", "w") as f:
        json.dump(meta, f, indent=1)
        _sync(f)
    if final.exists():  # the same round saved again (a resumed run repeats the round it was killed in)
        shutil.rmtree(final)
    tmp.rename(final)
    _sync_dir(root)
    prune(root, keep=keep, also_keep=also_keep)
    return final


def read(path: Path) -> Checkpoint:
    """One checkpoint directory; CheckpointError naming the file when it cannot be read."""
    path = Path(path)
    try:
        meta = json.loads((path / "checkpoint.json").read_text())
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise CheckpointError(f"{path}: not a {FORMAT} version {VERSION} checkpoint")
        with np.load(path / "arrays.npz") as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path}: cannot read this checkpoint ({err})") from err
    return Checkpoint(
        path=path,
        server_round=int(meta["round"]),
        state=decode(meta["state"], arrays),
        global_arrays={k.removeprefix("global/"): v for k, v in arrays.items() if k.startswith("global/")},
        adapter={k.removeprefix("adapter/"): v for k, v in arrays.items() if k.startswith("adapter/")},
    )


def rounds(run_path: Path) -> dict[int, Path]:
    """{round: directory} of the complete checkpoints of a run, oldest first."""
    root = Path(run_path) / DIRECTORY
    found = {int(m.group(1)): p for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()} if root.is_dir() else {}
    return dict(sorted(found.items()))


def latest(run_path: Path, server_round: int | None = None) -> Checkpoint:
    """The newest checkpoint of a run that reads (or round ``server_round``'s)."""
    found = rounds(run_path)
    if server_round is not None:
        if server_round not in found:
            raise CheckpointError(f"{run_path}: no checkpoint of round {server_round}; there are rounds {sorted(found) or 'none'}")
        return read(found[server_round])
    errors = []
    for path in reversed(found.values()):
        try:
            return read(path)
        except CheckpointError as err:
            errors.append(str(err))
    why = "; ".join(errors) if errors else f"no {DIRECTORY}/round-* directory"
    raise CheckpointError(f"{run_path}: no checkpoint to resume from ({why})")


def prune(root: Path, *, keep: int, also_keep: int | None = None) -> None:
    """Remove all but the newest ``keep`` checkpoints (and ``also_keep``'s) and any partial one."""
    found = rounds(root.parent)
    kept = set(list(found)[-keep:]) | ({also_keep} if also_keep is not None else set())
    for rnd, path in found.items():
        if rnd not in kept:
            shutil.rmtree(path, ignore_errors=True)
    for stale in root.glob(".round-*.partial"):
        shutil.rmtree(stale, ignore_errors=True)


def size_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _sync(f) -> None:
    f.flush()
    os.fsync(f.fileno())


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
