"""The emulated testbed: a SuperLink and N SuperNodes on one Linux host, each in its own
network namespace, joined by a bridge, with per-node links and device classes taken
from ``deploy/profiles.toml``.

    <prefix>-sw   a bridge; one veth per namespace below is plugged into it
    <prefix>-sl   flower-superlink (and the ServerApp, and `flwr run`)   10.213.K.1
    <prefix>-nI   stamen-supernode I, in a cgroup of its device class    10.213.K.(10+I)
                  + a delay proxy on 127.0.0.1 (the node dials it; it forwards to .1)

Shaping: tbf on the node's own veth end (uplink) and on the bridge's end facing the node
(downlink); delay and jitter: deploy/delay_proxy.py in the node's namespace (this kernel
has no netem). CPU quota and memory limit: deploy/cgroups.py.

Safety: no address is created outside the namespaces this module made, none of them has
a route beyond its subnet, every address is checked to exist where it should before any
process starts, and everything (processes, namespaces, cgroups) goes on exit, on error
and on Ctrl-C. ``teardown(prefix)`` removes a crashed run's leftovers (``stamen testbed
down``). Needs root; ``available()`` says why not, and the CLI then offers loopback mode.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

from deploy import cgroups, netns
from deploy.local import LocalDeployment, NodeSpec
from stamen import keys

PROFILES = Path(__file__).with_name("profiles.toml")
PREFIX = "stmtb"  # every testbed namespace and cgroup name starts with it


@dataclass(frozen=True)
class Network:
    name: str
    down_mbit: float
    up_mbit: float
    delay_ms: float = 0.0
    jitter_ms: float = 0.0


@dataclass(frozen=True)
class DeviceClass:
    name: str
    cpus: float
    memory_gib: float
    lora_rank: int
    device_class: str  # the node-config label (the lora.rank-by-class key)


def load_profiles(path: Path = PROFILES) -> tuple[dict[str, Network], dict[str, DeviceClass]]:
    """Parse and validate the profiles file; errors name the entry and the key."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ValueError(f"cannot read testbed profiles {path}: {err}") from err

    def number(section: str, name: str, key: str, entry: dict, *, default=None, positive=True) -> float:
        if key not in entry and default is None:
            raise ValueError(f"{path}: [{section}.{name}] lacks `{key}`")
        value = entry.get(key, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or (positive and value == 0):
            raise ValueError(f"{path}: [{section}.{name}] `{key}` must be a {'positive' if positive else 'non-negative'} number, got {value!r}")
        return float(value)

    networks = {
        name: Network(
            name,
            down_mbit=number("network", name, "down-mbit", e),
            up_mbit=number("network", name, "up-mbit", e),
            delay_ms=number("network", name, "delay-ms", e, default=0.0, positive=False),
            jitter_ms=number("network", name, "jitter-ms", e, default=0.0, positive=False),
        )
        for name, e in raw.get("network", {}).items()
    }
    devices = {}
    for name, e in raw.get("device", {}).items():
        rank = e.get("lora-rank")
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"{path}: [device.{name}] `lora-rank` must be a positive integer, got {rank!r}")
        label = e.get("class")
        if not isinstance(label, str) or not label:
            raise ValueError(f"{path}: [device.{name}] `class` must be a device-class label, got {label!r}")
        devices[name] = DeviceClass(
            name, cpus=number("device", name, "cpus", e), memory_gib=number("device", name, "memory-gib", e),
            lora_rank=rank, device_class=label,
        )
    if not networks or not devices:
        raise ValueError(f"{path}: needs at least one [network.NAME] and one [device.NAME]")
    return networks, devices


def available() -> str | None:
    """None when the testbed can shape links and limit devices here, else the reason."""
    return netns.available() or cgroups.available(memory=True)


def _ip(ns: str | None, *args: str) -> str:
    """``ip [-n NS] ARGS``'s output (deploy/netns.py runs it and reports failures)."""
    return netns.ip(*(["-n", ns] if ns else []), *args).stdout


class Topology:
    """The namespaces, bridge, veths, addresses and tbf qdiscs (no processes)."""

    def __init__(
        self,
        run_prefix: str,
        links: list[Network | None],
        *,
        subnet: str = "10.213.0",
        congestion_control: str | None = netns.CONGESTION_CONTROL,
    ) -> None:
        if not run_prefix.startswith(PREFIX):
            raise ValueError(f"testbed namespaces must start with {PREFIX!r}, got {run_prefix!r}")
        if len(links) > 200:
            raise ValueError("at most 200 nodes per testbed")
        self.prefix = run_prefix
        self.links = links
        self.switch_ns, self.server_ns = f"{run_prefix}-sw", f"{run_prefix}-sl"
        self.node_ns = [f"{run_prefix}-n{i}" for i in range(len(links))]
        self.server_ip = f"{subnet}.1"
        self.node_ip = [f"{subnet}.{10 + i}" for i in range(len(links))]
        self.subnet = subnet
        self.congestion_control = congestion_control  # pinned per route: see deploy/netns.py

    def __enter__(self) -> Topology:
        if f"inet {self.subnet}." in _ip(None, "-4", "addr"):
            raise netns.NamespaceError(f"{self.subnet}.0/24 is in use on this host; pick another subnet")
        try:
            self._create()
            self.verify()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _create(self) -> None:
        for ns in (self.switch_ns, self.server_ns, *self.node_ns):
            _ip(None, "netns", "add", ns)
            _ip(ns, "link", "set", "lo", "up")
        _ip(self.switch_ns, "link", "add", "br0", "type", "bridge")
        _ip(self.switch_ns, "link", "set", "br0", "up")
        ends = [("sl", self.server_ns, self.server_ip)] + [
            (f"n{i}", ns, ip) for i, (ns, ip) in enumerate(zip(self.node_ns, self.node_ip, strict=True))
        ]
        for port, ns, ip in ends:  # created inside the namespaces: never present on the host
            _ip(self.switch_ns, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip(self.switch_ns, "link", "set", port, "master", "br0")
            _ip(self.switch_ns, "link", "set", port, "up")
            _ip(ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            _ip(ns, "link", "set", "eth0", "up")
            netns.pin_congestion_control(ns, "eth0", f"{self.subnet}.0/24", ip, self.congestion_control)
        for i, link in enumerate(self.links):
            if link is not None:
                netns.shape(self.node_ns[i], "eth0", link.up_mbit)  # the node's egress: its uplink
                netns.shape(self.switch_ns, f"n{i}", link.down_mbit)  # the bridge's egress toward it: its downlink

    def verify(self) -> None:
        """Every address is where it belongs, and no namespace has a route beyond the subnet."""
        for ns, ip in [(self.server_ns, self.server_ip), *zip(self.node_ns, self.node_ip, strict=True)]:
            if f"inet {ip}/24" not in _ip(ns, "-4", "addr", "show", "dev", "eth0"):
                raise netns.NamespaceError(f"{ip} did not appear inside {ns}")
            routes = [r for r in _ip(ns, "-4", "route").splitlines() if r.strip()]
            if any(not r.startswith(f"{self.subnet}.0/24") for r in routes):
                raise netns.NamespaceError(f"{ns} has a route beyond {self.subnet}.0/24: {routes}")

    def __exit__(self, *exc) -> None:
        for ns in (*self.node_ns, self.server_ns, self.switch_ns):
            netns.ip("netns", "delete", ns, check=False)


def teardown(prefix: str = PREFIX) -> dict[str, list[str]]:
    """Remove a testbed's leftovers: processes inside ``prefix*`` namespaces, the
    namespaces, and ``prefix*`` cgroups. Safe to run when nothing is left."""
    import psutil

    killed = []
    spaces = netns.namespaces(prefix) if shutil.which("ip") else []
    for ns in spaces:
        pids = netns.ip("netns", "pids", ns, check=False).stdout.split()
        procs = []
        for pid in pids:
            with contextlib.suppress(psutil.Error, ValueError):
                p = psutil.Process(int(pid))
                procs.append(p)
                killed.append(f"{pid} {p.name()}")
                p.terminate()
        _, alive = psutil.wait_procs(procs, timeout=10)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
    spaces = netns.cleanup(prefix) if spaces else []
    groups = cgroups.cleanup(prefix) if cgroups.version() else []
    return {"processes": killed, "namespaces": spaces, "cgroups": groups}


@dataclass(frozen=True)
class TestbedNode:
    device: DeviceClass
    network: Network


class Testbed:
    """Context manager: the topology, cgroups, delay proxies and a LocalDeployment on top.

    ``run(...)`` then works as LocalDeployment.run (``flwr run`` inside the SuperLink's
    namespace). Each node's node-config carries its partition, device class, LoRA rank and
    network label, exactly as on real devices.
    """

    def __init__(self, nodes: list[TestbedNode], *, workdir: Path, run_prefix: str | None = None,
                 app_dir: Path | None = None, threads: int | None = None, supernode_flags: list[str] = (),
                 emulate: Path | None = None) -> None:
        if not nodes:
            raise ValueError("a testbed needs at least one node")
        self.nodes = nodes
        self.workdir = workdir
        self.run_prefix = run_prefix or f"{PREFIX}{os.getpid() % 100000}"
        self.app_dir = app_dir
        self.threads = threads
        self.supernode_flags = list(supernode_flags)  # e.g. --transfer-concurrency 4
        # compute emulation (client_app/pace.py): no CPU quota; each node trains at this latency model's pace of its device
        self.emulate = Path(emulate).resolve() if emulate is not None else None
        self.topology = Topology(self.run_prefix, [n.network for n in nodes])
        self.limits: list[cgroups.Limits] = []
        self.proxies: list[subprocess.Popen] = []
        self.deployment: LocalDeployment | None = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Testbed:
        try:
            self._start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()  # in reverse: deployment, proxies, cgroups, namespaces

    def _start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        host_cpus = os.cpu_count() or 1
        self._stack.enter_context(self.topology)
        specs = []
        for i, node in enumerate(self.nodes):
            cpus = host_cpus if self.emulate else min(node.device.cpus, host_cpus)
            limit = self._stack.enter_context(
                cgroups.Limits(f"{self.run_prefix}-n{i}", cpus=cpus, memory_bytes=int(node.device.memory_gib * 2**30))
            )
            self.limits.append(limit)
            extra = {"network": node.network.name, "testbed-device": node.device.name,
                     "link-down-mbit": node.network.down_mbit, "link-up-mbit": node.network.up_mbit}
            if self.emulate:
                extra.update({keys.NODE_EMULATE_DEVICE: node.device.name, keys.NODE_LATENCY_MODEL: str(self.emulate)})
            specs.append(NodeSpec(
                partition_id=i, num_partitions=len(self.nodes), device_class=node.device.device_class,
                lora_rank=node.device.lora_rank,
                num_threads=self.threads or (1 if self.emulate else max(1, math.ceil(cpus))),
                extra=extra,
                netns=self.topology.node_ns[i], cgroups=tuple(map(str, limit.paths)), dial_host="127.0.0.1",
            ))
        kwargs = {"app_dir": self.app_dir} if self.app_dir else {}
        dep = LocalDeployment(specs, workdir=self.workdir, fleet_host=self.topology.server_ip,
                              superlink_netns=self.topology.server_ns, supernode_flags=self.supernode_flags, **kwargs)
        self._stack.callback(self._stop_proxies)
        for i, node in enumerate(self.nodes):  # one proxy per node: Fleet API and telemetry ports
            ports = (dep.fleet_port, dep.collector_port)
            cmd = ["ip", "netns", "exec", self.topology.node_ns[i], sys.executable, "-m", "deploy.delay_proxy",
                   "--up-ms", str(node.network.delay_ms), "--down-ms", str(node.network.delay_ms),
                   "--jitter-ms", str(node.network.jitter_ms), "--seed", str(i)]
            for port in ports:
                cmd += ["--listen", f"127.0.0.1:{port}", "--target", f"{self.topology.server_ip}:{port}"]
            log = open(self.workdir / f"delay-proxy-{i}.log", "w")
            self.proxies.append(subprocess.Popen(cmd, cwd=Path(__file__).resolve().parent.parent, stdout=log,
                                                 stderr=subprocess.STDOUT, start_new_session=True))
            log.close()
        self.deployment = self._stack.enter_context(dep)

    def _stop_proxies(self) -> None:
        for p in self.proxies:
            if p.poll() is None:
                p.terminate()
        for p in self.proxies:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
        self.proxies.clear()

    def run(self, run_config: list[str] = (), **kwargs) -> int:
        assert self.deployment is not None, "use Testbed inside `with`"
        return self.deployment.run(run_config, **kwargs)

    def run_status(self, run_id: int) -> str:
        assert self.deployment is not None
        return self.deployment.run_status(run_id)
