"""Two network namespaces joined by a veth pair, each direction shaped with tbf.

    with NamespacePair("stm-1234", down_mbit=20, up_mbit=10) as link:
        link.server_ns, link.server_ip     # where the SuperLink runs
        link.node_ns, link.node_ip         # where a SuperNode runs

Needs root and iproute2. Safety: the namespaces have no route anywhere but each other,
so a process inside them can reach only the other end; the addresses are checked to
exist inside the namespaces before the caller gets them; everything is deleted on exit
(deleting a namespace deletes its veth end), and ``cleanup(prefix)`` removes leftovers
of a crashed run. Delay emulation is not here: this kernel has no netem (issue 4).

TCP on an emulated link. The senders' TCP stacks sit right behind the shaper, with no
propagation delay (the testbed's delay is a userspace proxy, deploy/delay_proxy.py), so
the round trip TCP measures is the tbf queue and little else. Two settings keep transfer
times reproducible, measured with tests/test_link_shaping.py (4 transfers of 1-4 MB per
run at 8/4 Mbit/s):

- the queue holds at most 50 ms of traffic, well under the 200 ms floor of TCP's
  retransmission time-out: with 200 ms, a transfer stalled by 0.5-1.4 s in 4 of 19 runs
  (BBR or cubic); with 50 ms and cubic, by about 0.5 s in 2 of 34 (cause not found: no
  time-out on the sending side), see docs/measurements.md;
- congestion control is pinned to cubic per route (``pin_congestion_control``), the
  default of the devices emulated (Raspberry Pi OS, Jetson Linux, Android) and of most
  servers, so the figures do not depend on what the host running the emulation sets
  (this one sets BBR).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from pathlib import Path


class NamespaceError(RuntimeError):
    pass


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``ip ARGS``; NamespaceError with ip's own message when it fails (and ``check``)."""
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and out.returncode != 0:
        raise NamespaceError(f"ip {' '.join(args)}: {out.stderr.strip()}")
    return out


def namespaces(prefix: str) -> list[str]:
    """The network namespaces whose names start with ``prefix``."""
    names = [line.split()[0] for line in ip("netns", "list").stdout.splitlines() if line.strip()]
    return [n for n in names if n.startswith(prefix)]


QUEUE_MS = 50  # the most a shaped link queues; see the module docstring


def shape(ns: str, dev: str, mbit: float) -> None:
    """tbf on ``dev``'s egress inside ``ns``: ``mbit`` Mbit/s, at most ``QUEUE_MS`` queued.

    The bucket holds at least one timer tick of traffic (4 ms at HZ=250), or tbf falls
    short of its rate at high speeds; 32 KB is the floor for slow links.
    """
    burst = max(32 * 1024, math.ceil(mbit * 1e6 / 8 * 0.004))
    ip("netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
       "rate", f"{mbit}mbit", "burst", str(burst), "latency", f"{QUEUE_MS}ms")


CONGESTION_CONTROL = "cubic"


def pin_congestion_control(ns: str, dev: str, cidr: str, src: str, algorithm: str | None = CONGESTION_CONTROL) -> None:
    """TCP connections over ``dev``'s connected route ``cidr`` in ``ns`` use ``algorithm``.

    A route attribute (``ip route ... congctl``), because the per-namespace sysctl may be
    read-only inside containers. ``None`` leaves the host's default. An algorithm this
    kernel lacks is refused with the ones it has.
    """
    if algorithm is None:
        return
    have = Path("/proc/sys/net/ipv4/tcp_available_congestion_control")
    if have.is_file() and algorithm not in (names := have.read_text().split()):
        raise NamespaceError(f"TCP congestion control {algorithm!r} is not available here (have: {', '.join(names)})")
    ip("-n", ns, "route", "replace", cidr, "dev", dev, "proto", "kernel", "scope", "link", "src", src, "congctl", algorithm)


def available() -> str | None:
    """None when namespaces and tc can be used here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    probe = f"stamen-probe-{os.getpid()}"
    out = ip("netns", "add", probe, check=False)
    if out.returncode != 0:
        return f"cannot create a network namespace: {out.stderr.strip()}"
    ip("netns", "delete", probe, check=False)
    return None


def cleanup(prefix: str) -> list[str]:
    """Delete every namespace whose name starts with ``prefix`` (a crashed run's leftovers)."""
    gone = namespaces(prefix)
    for name in gone:
        ip("netns", "delete", name, check=False)
    return gone


class NamespacePair:
    def __init__(
        self,
        prefix: str,
        *,
        subnet: str = "10.213.7",
        down_mbit: float | None = None,
        up_mbit: float | None = None,
        congestion_control: str | None = CONGESTION_CONTROL,
    ) -> None:
        self.prefix = prefix
        self.congestion_control = congestion_control
        self.server_ns, self.node_ns = f"{prefix}-sl", f"{prefix}-sn"
        self.server_ip, self.node_ip = f"{subnet}.1", f"{subnet}.2"
        self._subnet = subnet
        self.down_mbit, self.up_mbit = down_mbit, up_mbit
        self._veth = (f"{prefix[:8]}-a", f"{prefix[:8]}-b")  # interface names: at most 15 characters

    def __enter__(self) -> NamespacePair:
        if self._subnet + "." in ip("-4", "addr").stdout:
            raise NamespaceError(f"{self._subnet}.0/30 is in use on this host; pick another subnet")
        try:
            self._create()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _create(self) -> None:
        a, b = self._veth
        for ns in (self.server_ns, self.node_ns):
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ip("link", "add", a, "type", "veth", "peer", "name", b)
        ip("link", "set", a, "netns", self.server_ns)
        ip("link", "set", b, "netns", self.node_ns)
        for ns, dev, addr in ((self.server_ns, a, self.server_ip), (self.node_ns, b, self.node_ip)):
            ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
            pin_congestion_control(ns, dev, f"{self._subnet}.0/30", addr, self.congestion_control)
        for ns, dev, mbit in ((self.server_ns, a, self.down_mbit), (self.node_ns, b, self.up_mbit)):
            if mbit:
                shape(ns, dev, mbit)
        for ns, addr in ((self.server_ns, self.server_ip), (self.node_ns, self.node_ip)):
            if f"inet {addr}/30" not in ip("-n", ns, "-4", "addr", "show").stdout:
                raise NamespaceError(f"{addr} did not appear inside {ns}")

    def __exit__(self, *exc) -> None:
        for ns in (self.server_ns, self.node_ns):
            ip("netns", "delete", ns, check=False)
