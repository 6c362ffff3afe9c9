"""Two network namespaces joined by a veth pair, each direction shaped with tbf.

    with NamespacePair("stm-1234", down_mbit=20, up_mbit=10) as link:
        link.server_ns, link.server_ip     # where the SuperLink runs
        link.node_ns, link.node_ip         # where a SuperNode runs

Needs root and iproute2. Safety: the namespaces have no route anywhere but each other,
so a process inside them can reach only the other end; the addresses are checked to
exist inside the namespaces before the caller gets them; everything is deleted on exit
(deleting a namespace deletes its veth end), and ``cleanup(prefix)`` removes leftovers
of a crashed run. Delay emulation is not here: this kernel has no netem (issue 4).
"""

from __future__ import annotations

import os
import shutil
import subprocess


class NamespaceError(RuntimeError):
    pass


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and out.returncode != 0:
        raise NamespaceError(f"ip {' '.join(args)}: {out.stderr.strip()}")
    return out


def available() -> str | None:
    """None when namespaces and tc can be used here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    probe = "stamen-probe-%d" % os.getpid()
    out = _ip("netns", "add", probe, check=False)
    if out.returncode != 0:
        return f"cannot create a network namespace: {out.stderr.strip()}"
    _ip("netns", "delete", probe, check=False)
    return None


def cleanup(prefix: str) -> list[str]:
    """Delete every namespace whose name starts with ``prefix`` (a crashed run's leftovers)."""
    names = [line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()]
    gone = [n for n in names if n.startswith(prefix)]
    for name in gone:
        _ip("netns", "delete", name, check=False)
    return gone


class NamespacePair:
    def __init__(self, prefix: str, *, subnet: str = "10.213.7", down_mbit: float | None = None, up_mbit: float | None = None) -> None:
        self.prefix = prefix
        self.server_ns, self.node_ns = f"{prefix}-sl", f"{prefix}-sn"
        self.server_ip, self.node_ip = f"{subnet}.1", f"{subnet}.2"
        self._subnet = subnet
        self.down_mbit, self.up_mbit = down_mbit, up_mbit
        self._veth = (f"{prefix[:8]}-a", f"{prefix[:8]}-b")  # interface names: at most 15 characters

    def __enter__(self) -> NamespacePair:
        if self._subnet + "." in _ip("-4", "addr").stdout:
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
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("link", "add", a, "type", "veth", "peer", "name", b)
        _ip("link", "set", a, "netns", self.server_ns)
        _ip("link", "set", b, "netns", self.node_ns)
        for ns, dev, addr in ((self.server_ns, a, self.server_ip), (self.node_ns, b, self.node_ip)):
            _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
        for ns, dev, mbit in ((self.server_ns, a, self.down_mbit), (self.node_ns, b, self.up_mbit)):
            if mbit:
                self.shape(ns, dev, mbit)
        for ns, addr in ((self.server_ns, self.server_ip), (self.node_ns, self.node_ip)):
            if f"inet {addr}/30" not in _ip("-n", ns, "-4", "addr", "show").stdout:
                raise NamespaceError(f"{addr} did not appear inside {ns}")

    @staticmethod
    def shape(ns: str, dev: str, mbit: float) -> None:
        """tbf on ``dev``'s egress: ``mbit`` Mbit/s, a 32 KB bucket, at most 200 ms queued."""
        cmd = ["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
               "rate", f"{mbit}mbit", "burst", "32kb", "latency", "200ms"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            raise NamespaceError(f"{' '.join(cmd)}: {out.stderr.strip()}")

    def __exit__(self, *exc) -> None:
        for ns in (self.server_ns, self.node_ns):
            _ip("netns", "delete", ns, check=False)
