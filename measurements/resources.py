"""Resource samples of the process that trains: RSS, CPU, temperature, GPU memory.

A background thread samples every ``interval`` seconds with psutil while a handler runs.
Temperatures come from the kernel's thermal zones (``/sys/class/thermal``: Raspberry Pi's
``cpu-thermal``, Jetson's ``cpu-thermal``/``gpu-thermal``/...) or psutil's hwmon sensors;
machines without sensors (VMs, containers) leave the column empty. GPU memory is
torch's allocator figure, read only when this process has initialised CUDA.
"""

from __future__ import annotations

import glob
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil


def read_temperature_c() -> float | None:
    """The hottest thermal zone, in degrees Celsius, or None without sensors."""
    temps = []
    for path in glob.glob("/sys/class/thermal/thermal_zone*/temp"):
        try:
            with open(path) as f:
                temps.append(int(f.read().strip()) / 1000.0)
        except (OSError, ValueError):
            continue
    if not temps and hasattr(psutil, "sensors_temperatures"):
        try:
            temps = [s.current for entries in psutil.sensors_temperatures().values() for s in entries if s.current]
        except (OSError, RuntimeError):
            temps = []
    return max(temps) if temps else None


def process_age_s() -> float:
    """Seconds since this process started, to the kernel's 10 ms tick.

    From ``/proc/self/stat``'s start time (ticks after boot) against CLOCK_BOOTTIME, both
    counted from boot. ``psutil.Process().create_time()`` adds the boot time, which Linux
    gives in whole seconds (``/proc/stat`` btime), so ``now - create_time()`` is off by
    a constant up to a second: 0.47 s on this machine, for a process a few ms old.
    Elsewhere (no /proc), psutil's figure.
    """
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of proc(5); fields[0] is field 3
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, ValueError, IndexError, AttributeError):
        return max(0.0, time.time() - psutil.Process().create_time())


def _cuda():
    # Never import torch just to sample. The sampler thread may run while the handler is
    # still importing torch: a partially initialized module has no `cuda` yet.
    cuda = getattr(sys.modules.get("torch"), "cuda", None)
    try:
        if cuda is not None and cuda.is_available() and cuda.is_initialized():
            return cuda
    except (AttributeError, RuntimeError):  # torch.cuda itself half imported
        pass
    return None


def gpu_memory_bytes() -> int | None:
    cuda = _cuda()
    return int(cuda.memory_allocated()) if cuda is not None else None


def gpu_peak_memory_bytes() -> int | None:
    cuda = _cuda()
    return int(cuda.max_memory_allocated()) if cuda is not None else None


def reset_gpu_peak() -> None:
    cuda = _cuda()
    if cuda is not None:
        cuda.reset_peak_memory_stats()


@dataclass
class Sample:
    unix_s: float
    rss_bytes: int
    cpu_pct: float  # this process; 100 = one core busy
    system_cpu_pct: float  # the whole machine; 100 = every core busy
    temp_c: float | None
    gpu_mem_bytes: int | None


def _cpu_seconds(process: psutil.Process) -> float | None:
    """User + system CPU seconds of ``process`` (every thread), None once it is gone."""
    try:
        t = process.cpu_times()
    except psutil.Error:
        return None
    return t.user + t.system


class ResourceSampler:
    """``with ResourceSampler(0.5) as s: ...`` then ``s.samples`` and ``s.summary()``."""

    def __init__(
        self,
        interval: float = 0.5,
        process: psutil.Process | None = None,
        on_sample: Callable[[Sample], None] | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"sample interval must be > 0 seconds, got {interval}")
        self.interval = interval
        self.process = process or psutil.Process()
        self.samples: list[Sample] = []
        self.on_sample = on_sample
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start: tuple[float, float | None] = (0.0, None)
        self._span: tuple[float, float] | None = None  # (wall s, CPU s) from enter to exit

    def __enter__(self) -> ResourceSampler:
        self.process.cpu_percent(None)  # the first call only starts psutil's counters
        psutil.cpu_percent(None)
        self._span = None
        self._start = (time.perf_counter(), _cpu_seconds(self.process))
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="stamen-resource-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()  # the interval since the last sample
        wall0, cpu0 = self._start
        cpu1 = _cpu_seconds(self.process)
        if cpu0 is not None and cpu1 is not None:
            self._span = (time.perf_counter() - wall0, cpu1 - cpu0)

    def _run(self) -> None:
        failures = 0
        while not self._stop.wait(self.interval):
            try:
                self._sample()
            except Exception as err:  # one bad sample must not end the series
                failures += 1
                if failures == 1:
                    print(f"[stamen] resource sample failed (the sampler goes on): {err!r}", file=sys.stderr, flush=True)

    def _sample(self) -> None:
        try:
            sample = Sample(
                unix_s=time.time(),
                rss_bytes=self.process.memory_info().rss,
                cpu_pct=self.process.cpu_percent(None),
                system_cpu_pct=psutil.cpu_percent(None),
                temp_c=read_temperature_c(),
                gpu_mem_bytes=gpu_memory_bytes(),
            )
        except psutil.Error:
            return
        self.samples.append(sample)
        if self.on_sample is not None:
            self.on_sample(sample)

    def summary(self) -> dict[str, float]:
        """Peak RSS, mean and max CPU, max temperature; keys carry units.

        ``cpu_mean_pct`` is the process's CPU seconds over the wall seconds between enter
        and exit, as the kernel accounts them, not a mean of the samples: the last sample
        covers whatever was left of an interval, and a short span may have no other.
        ``cpu_max_pct`` is the busiest sampling interval.
        """
        out: dict[str, float] = {}
        if not self.samples:
            return out
        cpu = [s.cpu_pct for s in self.samples]
        out["rss_peak_bytes"] = float(max(s.rss_bytes for s in self.samples))
        if self._span is not None and self._span[0] > 0:
            wall, cpu_s = self._span
            out["cpu_s"] = cpu_s
            out["cpu_mean_pct"] = 100.0 * cpu_s / wall
        else:  # the process's CPU times could not be read at enter or exit (it is gone)
            out["cpu_mean_pct"] = sum(cpu) / len(cpu)
        out["cpu_max_pct"] = max(cpu)
        temps = [s.temp_c for s in self.samples if s.temp_c is not None]
        if temps:
            out["temp_max_c"] = max(temps)
        return out
