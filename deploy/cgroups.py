"""A CPU quota for a group of processes, through whichever cgroup version is mounted.

    with CpuQuota("stamen-node-0", cpus=0.25) as cg:   # a quarter of one core
        NodeSpec(..., cgroup=cg.path)                   # the SuperNode and its children join it

cgroup v1 (``/sys/fs/cgroup/cpu``): ``cpu.cfs_quota_us`` over ``cpu.cfs_period_us``;
cgroup v2 (``/sys/fs/cgroup/cgroup.controllers``): ``cpu.max``. Needs root. The group is
removed on exit (after its processes are gone).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
PERIOD_US = 100_000


def cpu_cgroup_root() -> tuple[Path, int] | None:
    """(where CPU cgroups are created, cgroup version), or None if none can be used."""
    if (ROOT / "cgroup.controllers").is_file() and "cpu" in (ROOT / "cgroup.controllers").read_text().split():
        return ROOT, 2
    if (ROOT / "cpu" / "cpu.cfs_quota_us").is_file():
        return ROOT / "cpu", 1
    return None


def available() -> str | None:
    if os.geteuid() != 0:
        return "cgroups need root"
    if cpu_cgroup_root() is None:
        return "no cgroup cpu controller is mounted under /sys/fs/cgroup"
    return None


class CpuQuota:
    def __init__(self, name: str, *, cpus: float) -> None:
        if cpus <= 0:
            raise ValueError(f"cpus must be > 0, got {cpus}")
        found = cpu_cgroup_root()
        if found is None:
            raise RuntimeError("no cgroup cpu controller is mounted under /sys/fs/cgroup")
        root, self.version = found
        self.path = root / name
        self.cpus = cpus

    def __enter__(self) -> CpuQuota:
        self.path.mkdir(exist_ok=True)
        quota = max(1000, int(self.cpus * PERIOD_US))
        if self.version == 2:
            (self.path / "cpu.max").write_text(f"{quota} {PERIOD_US}")
        else:
            (self.path / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (self.path / "cpu.cfs_quota_us").write_text(str(quota))
        return self

    def __exit__(self, *exc) -> None:
        for _ in range(50):  # processes that just exited may still be listed for a moment
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)
