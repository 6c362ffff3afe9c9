"""Named phases inside a handler: ``with phase("load"): ...``.

The ClientApp mod (measurements/client_mod.py) installs a recorder around the handler;
without one (instrumentation off, or code called outside a ClientApp), ``phase`` costs
two clock reads and records nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar


class PhaseRecorder:
    def __init__(self) -> None:
        self.durations: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.durations[name] = self.durations.get(name, 0.0) + seconds


_current: ContextVar[PhaseRecorder | None] = ContextVar("stamen_phase_recorder", default=None)


@contextmanager
def phase(name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        recorder = _current.get()
        if recorder is not None:
            recorder.add(name, time.perf_counter() - t0)


@contextmanager
def recording() -> Iterator[PhaseRecorder]:
    recorder = PhaseRecorder()
    token = _current.set(recorder)
    try:
        yield recorder
    finally:
        _current.reset(token)
