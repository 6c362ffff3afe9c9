"""CPU quota and memory limit for a group of processes, through whichever cgroup version
is mounted (v1: one hierarchy per controller; v2: the unified one).

    with Limits("stamen-node-0", cpus=0.25, memory_bytes=4 << 30) as cg:
        NodeSpec(..., cgroups=cg.paths)    # the SuperNode and its children join every path

CPU: v1 ``cpu.cfs_quota_us`` over ``cpu.cfs_period_us``, v2 ``cpu.max``. Memory: v1
``memory.limit_in_bytes``, v2 ``memory.max``. Groups are created under the cgroup this
process already belongs to (read from /proc/self/cgroup), so they stay inside whatever
limits a container or a systemd slice already sets. Needs root (or a delegated
subtree). Groups are removed on exit, after their processes are gone; ``cleanup(prefix)``
removes a crashed run's leftovers.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
PERIOD_US = 100_000


def _own_path(controller: str) -> str:
    """This process's cgroup path for ``controller`` ('' for the v2 unified hierarchy)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return "/"
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers.split(",") == [controller] or (controller == "" and controllers == ""):
            return path
        if controller and controller in controllers.split(","):
            return path
    return "/"


def version() -> int | None:
    """2 (unified), 1 (per-controller hierarchies with cpu), or None (no usable cpu controller)."""
    if (ROOT / "cgroup.controllers").is_file() and "cpu" in (ROOT / "cgroup.controllers").read_text().split():
        return 2
    if (ROOT / "cpu" / "cpu.cfs_quota_us").is_file():
        return 1
    return None


def parent_dir(controller: str) -> Path:
    """Where this process may create child groups for ``controller`` ('cpu' or 'memory')."""
    if version() == 2:
        return ROOT / _own_path("").lstrip("/")
    return ROOT / controller / _own_path(controller).lstrip("/")


def available(*, memory: bool = False) -> str | None:
    """None when CPU (and, with ``memory``, memory) limits can be set here, else why not."""
    if os.geteuid() != 0:
        return "cgroups need root"
    v = version()
    if v is None:
        return "no cgroup cpu controller is mounted under /sys/fs/cgroup"
    if memory:
        if v == 1 and not (ROOT / "memory" / "memory.limit_in_bytes").is_file():
            return "no cgroup v1 memory controller is mounted under /sys/fs/cgroup/memory"
        if v == 2 and "memory" not in (ROOT / "cgroup.controllers").read_text().split():
            return "the cgroup v2 memory controller is not enabled"
    return None


def _remove(path: Path) -> None:
    for _ in range(50):  # processes that just exited may still be listed for a moment
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.1)


def cleanup(prefix: str) -> list[str]:
    """Remove groups named ``prefix*`` (empty ones; kill their processes first)."""
    gone = []
    parents = {parent_dir("cpu"), parent_dir("memory")} if version() == 1 else {parent_dir("cpu")}
    for parent in parents:
        if parent.is_dir():
            for child in parent.iterdir():
                if child.is_dir() and child.name.startswith(prefix):
                    _remove(child)
                    gone.append(str(child))
    return gone


class Limits:
    """A CPU quota (in cores of this host) and/or a memory limit (bytes) for one group."""

    def __init__(self, name: str, *, cpus: float | None = None, memory_bytes: int | None = None) -> None:
        if cpus is not None and cpus <= 0:
            raise ValueError(f"cpus must be > 0, got {cpus}")
        if memory_bytes is not None and memory_bytes < 16 << 20:
            raise ValueError(f"memory_bytes must be at least 16 MiB, got {memory_bytes}")
        if "/" in name or not name:
            raise ValueError(f"a cgroup name is one path component, got {name!r}")
        self.version = version()
        if self.version is None:
            raise RuntimeError("no cgroup cpu controller is mounted under /sys/fs/cgroup")
        self.name, self.cpus, self.memory_bytes = name, cpus, memory_bytes
        if self.version == 2:
            self.paths = [parent_dir("cpu") / name]
        else:
            self.paths = [parent_dir("cpu") / name] + ([parent_dir("memory") / name] if memory_bytes else [])

    @property
    def path(self) -> Path:
        return self.paths[0]

    def __enter__(self) -> Limits:
        try:
            for p in self.paths:
                p.mkdir(exist_ok=True)
            if self.cpus is not None:
                quota = max(1000, int(self.cpus * PERIOD_US))
                if self.version == 2:
                    (self.path / "cpu.max").write_text(f"{quota} {PERIOD_US}")
                else:
                    (self.path / "cpu.cfs_period_us").write_text(str(PERIOD_US))
                    (self.path / "cpu.cfs_quota_us").write_text(str(quota))
            if self.memory_bytes is not None:
                if self.version == 2:
                    (self.path / "memory.max").write_text(str(self.memory_bytes))
                else:
                    (self.paths[1] / "memory.limit_in_bytes").write_text(str(self.memory_bytes))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for p in self.paths:
            _remove(p)

