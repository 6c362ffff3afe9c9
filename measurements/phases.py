"""Named phases inside a handler: ``with phase("load"): ...``.

The ClientApp mod (measurements/client_mod.py) installs a recorder around the handler;
without one (instrumentation off, or code called outside a ClientApp), ``phase`` costs
four clock reads and records nothing.

Each phase records its wall time and the CPU time the whole process spent meanwhile
(``time.process_time``: user + system, every thread), as the kernel accounts it. CPU over
wall is the cores the phase kept busy: 0.25 under a quarter-core quota, up to the thread
count for a multi-threaded training loop.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar


class PhaseRecorder:
    def __init__(self) -> None:
        self.durations: dict[str, float] = {}  # wall seconds
        self.cpu: dict[str, float] = {}  # process CPU seconds

    def add(self, name: str, seconds: float, cpu_seconds: float = 0.0) -> None:
        self.durations[name] = self.durations.get(name, 0.0) + seconds
        self.cpu[name] = self.cpu.get(name, 0.0) + cpu_seconds


_current: ContextVar[PhaseRecorder | None] = ContextVar("stamen_phase_recorder", default=None)


@contextmanager
def phase(name: str) -> Iterator[None]:
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        recorder = _current.get()
        if recorder is not None:
            recorder.add(name, time.perf_counter() - t0, time.process_time() - c0)


@contextmanager
def recording() -> Iterator[PhaseRecorder]:
    recorder = PhaseRecorder()
    token = _current.set(recorder)
    try:
        yield recorder
    finally:
        _current.reset(token)


def note(name: str, seconds: float) -> None:
    """Add ``seconds`` to phase ``name`` without timing a block (a figure computed, not
    waited for); nothing without a recorder."""
    recorder = _current.get()
    if recorder is not None:
        recorder.add(name, seconds)
