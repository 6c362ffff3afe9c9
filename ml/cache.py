"""What a warm device runtime keeps between the messages of a run: the objects a ClientApp
builds the same way for every message (the task and its data split, the node's partition,
the base model).

Off unless the runtime turns it on for a run (``STAMEN_WARM_RUN=<run id>``, set by
``device_runtime/executor.py``). In a cold process (a fresh ``flwr-clientapp`` per
message, or a Ray worker of Flower's simulation engine) ``cached(key, build)`` is just
``build()``, so nothing is shared between messages, nodes or runs there.

Under the warm runtime the executor fills the cache before it forks a worker for a
message (the ClientApp module's ``preload(context)``), and the worker reads it. The
worker's memory is a copy-on-write image of the executor's: a model the worker changes
(downlinked weights, a fresh LoRA, pruning) is changed in the worker's pages only, and the
executor's copy stays as loaded for the next message.

Keys are the run id plus what the object depends on (config sections, partition). An
entry of another run is dropped when the first entry of a new run is made, so a new run
never sees another run's objects, and the cache holds one run at a time.

``once=True`` (for objects the handler changes, such as the model): in a process other
than the one that built it, an entry is handed out once; a second request builds a fresh
object, as it would in a cold process.

Written by hand: ``functools.cache`` has neither the run scope nor the hand-out-once rule.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable
from typing import TypeVar

ENV_VAR = "STAMEN_WARM_RUN"

T = TypeVar("T")
_entries: dict[tuple, object] = {}
_built_by: dict[tuple, int] = {}  # key -> pid of the process that built it
_taken: set[tuple] = set()  # keys this process has handed out once


def run_scope() -> str | None:
    """The run the cache serves in this process, or None when it is off."""
    return os.environ.get(ENV_VAR) or None


def cached(key: tuple[Hashable, ...], build: Callable[[], T], *, once: bool = False) -> T:
    """The object ``build()`` makes for ``key`` in this run, built at most once per run."""
    run = run_scope()
    if run is None:
        return build()
    full = (run, *key)
    for old in [k for k in _entries if k[0] != run]:  # another run's: never served again
        _forget(old)
    pid = os.getpid()
    if full in _entries and not (once and full in _taken):
        if once and _built_by[full] != pid:
            _taken.add(full)
        return _entries[full]  # type: ignore[return-value]
    value = build()
    if full not in _entries:
        _entries[full], _built_by[full] = value, pid
    return value


def clear() -> None:
    for key in list(_entries):
        _forget(key)


def _forget(key: tuple) -> None:
    _entries.pop(key, None)
    _built_by.pop(key, None)
    _taken.discard(key)
