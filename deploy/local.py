"""A real deployment on loopback: one ``flower-superlink``, N SuperNodes (each with its
own --node-config) and ``flwr run``, all on 127.0.0.1.

SuperNodes are ``stamen-supernode`` (flower-supernode plus transfer timing and telemetry,
streaming to the ServerApp's collector on a free port) or plain ``flower-supernode``.

Every process gets its own FLWR_HOME and log file under ``<output>/_deploy/<stamp>/``.
All of them are stopped when the run ends, fails, or is interrupted (Ctrl-C).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SUPERNODES = {"stamen": "stamen-supernode", "flower": "flower-supernode"}


def merge_overrides(items: list[str]) -> str:
    """One --run-config string from 'k=v ...' strings and TOML files, later ones winning.

    (``flwr run`` keeps only the last --run-config flag, so they are merged here with
    Flower's own parser.)
    """
    from flwr.common.config import parse_config_args

    merged: dict[str, object] = {}
    for item in items:
        merged.update(parse_config_args([item]))
    return " ".join(f"{k}={json.dumps(v)}" for k, v in merged.items())


@dataclass(frozen=True)
class NodeSpec:
    """One SuperNode: its partition and what it claims to be (node-config)."""

    partition_id: int
    num_partitions: int
    device_class: str | None = None
    lora_rank: int | None = None
    num_threads: int | None = None
    extra: dict[str, str | int | float] = field(default_factory=dict)
    supernode: str | None = None  # "stamen" or "flower"; None: the deployment's choice
    netns: str | None = None  # run inside this network namespace (deploy/netns.py)
    cgroups: tuple[str, ...] = ()  # join these cgroup directories (CPU quota, memory limit) before starting
    dial_host: str | None = None  # where this node reaches the SuperLink and collector (e.g. a local delay proxy)
    env: dict[str, str] = field(default_factory=dict)  # extra environment of this node's processes

    def node_config(self) -> str:
        items: dict[str, object] = {"partition-id": self.partition_id, "num-partitions": self.num_partitions}
        if self.device_class:
            items["device-class"] = self.device_class
        if self.lora_rank:
            items["lora-rank"] = self.lora_rank
        if self.num_threads:
            items["num-threads"] = self.num_threads
        items.update(self.extra)
        return " ".join(f"{k}={json.dumps(v)}" for k, v in items.items())


def _git_describe(path: Path) -> str:
    """HEAD's commit, with '-dirty' when the work tree has changes (for the run directory)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=path, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def stage_app(app_dir: Path, dest: Path) -> Path:
    """A copy of the app's own files for ``flwr run`` to build its FAB from; ``app_dir``
    itself where it is not a git checkout.

    flwr 1.39 walks every file under the app directory, resolving each one, before it
    applies .gitignore: in a checkout with its .venv that is about 60,000 files and 8.7 s
    of every ``flwr run``. The files git lists (tracked, and untracked ones it does not
    ignore) are what the FAB can hold; copying them takes milliseconds."""
    import shutil

    try:
        listed = subprocess.run(
            ["git", "-C", str(app_dir), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            capture_output=True, timeout=30, check=True,
        ).stdout.split(b"\0")
    except (OSError, subprocess.SubprocessError):
        return app_dir
    names = [n.decode() for n in listed if n]
    if "pyproject.toml" not in names:
        return app_dir
    shutil.rmtree(dest, ignore_errors=True)
    for name in names:
        src = Path(app_dir) / name
        if src.is_file() and not src.is_symlink():  # (a file deleted but not yet staged in git is skipped)
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _in_netns(netns: str | None) -> list[str]:
    return ["ip", "netns", "exec", netns] if netns else []


def _port_open(host: str, port: int, netns: str | None) -> bool:
    if netns is None:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return True
        return False
    probe = f"import socket; socket.create_connection(({host!r}, {port}), timeout=1)"
    return subprocess.run([*_in_netns(netns), sys.executable, "-c", probe], capture_output=True, timeout=30).returncode == 0


def wait_for_port(
    port: int, timeout: float, proc: subprocess.Popen, name: str, log_file: Path, *, host: str = "127.0.0.1", netns: str | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with code {proc.returncode}; see {log_file}")
        if _port_open(host, port, netns):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{name} did not open port {port} within {timeout:.0f} s; see {log_file}")


class LocalDeployment:
    """Context manager: processes are up inside ``with``, and gone after it."""

    def __init__(
        self,
        nodes: list[NodeSpec],
        *,
        workdir: Path,
        app_dir: Path = PROJECT_ROOT,
        supernode: str = "stamen",
        fleet_host: str = "127.0.0.1",
        superlink_netns: str | None = None,
        tls_dir: Path | None = None,
        supernode_auth: bool = False,
        supernode_flags: list[str] = (),
    ) -> None:
        """``tls_dir``: the files of deploy/tls/generate.sh (ca.crt, server.pem, server.key,
        supernode-I.key): TLS on the Fleet and Control APIs. ``supernode_auth``: the
        SuperLink accepts only SuperNodes whose public keys were registered (needs TLS);
        each node I uses supernode-I.key, registered with ``flwr supernode register``.
        ``supernode_flags``: extra flags of every stamen-supernode (its runtime and polls)."""
        if supernode_auth and tls_dir is None:
            raise ValueError("SuperNode authentication needs TLS: pass tls_dir")
        if tls_dir is not None:
            needed = ["ca.crt", "server.pem", "server.key"] + (
                [f"supernode-{i}.key" for i in range(len(nodes))] if supernode_auth else []
            )
            missing = [n for n in needed if not (Path(tls_dir) / n).is_file()]
            if missing:
                raise FileNotFoundError(f"{tls_dir} lacks {', '.join(missing)}: run deploy/tls/generate.sh {tls_dir} {len(nodes)}")
        self.tls_dir = Path(tls_dir).resolve() if tls_dir is not None else None
        self.supernode_auth = supernode_auth
        for i, node in enumerate(nodes):  # checked before anything starts
            if (node.supernode or supernode) not in SUPERNODES:
                raise ValueError(f"node {i}: supernode must be one of {', '.join(SUPERNODES)}, got {node.supernode or supernode!r}")
        self.nodes = nodes
        self.supernode = supernode
        self.supernode_flags = list(supernode_flags)
        self.fleet_host = fleet_host  # the SuperLink binds it; nodes dial it
        self.superlink_netns = superlink_netns
        self.collector_port = free_port()
        self.collector_address = f"{fleet_host}:{self.collector_port}"  # where stamen-supernodes stream telemetry
        self.workdir = workdir
        self.app_dir = app_dir
        self.procs: list[tuple[str, subprocess.Popen, Path]] = []
        self._node_procs: dict[int, subprocess.Popen] = {}  # node index -> its SuperNode process
        self._node_starts: dict[int, int] = {}
        self.fleet_port = free_port()
        self.http_port = free_port()
        self.flwr_home = workdir / "flwr-cli"
        bin_dir = str(Path(sys.executable).parent)
        self.env = {
            **os.environ,
            "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),  # SuperLink starts flower-superexec by name
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "PYTHONUNBUFFERED": "1",
            "STAMEN_GIT_COMMIT": _git_describe(app_dir),
        }

    def _spawn(
        self, name: str, cmd: list[str], home: Path, *, netns: str | None = None, cgroups: tuple[str, ...] = (), env: dict | None = None
    ) -> subprocess.Popen:
        home.mkdir(parents=True, exist_ok=True)
        log_file = self.workdir / f"{name}.log"
        out = open(log_file, "w")

        def join_cgroups() -> None:  # in the child, before exec: its children inherit the cgroups
            for cgroup in cgroups:
                with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                    f.write(str(os.getpid()))

        proc = subprocess.Popen(
            [*_in_netns(netns), *cmd],
            cwd=self.app_dir,
            env={**self.env, **(env or {}), "FLWR_HOME": str(home)},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: we stop it and its children together
            preexec_fn=join_cgroups if cgroups else None,
        )
        out.close()
        self.procs.append((name, proc, log_file))
        return proc

    def __enter__(self) -> LocalDeployment:
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _tls_flags(self) -> list[str]:
        if self.tls_dir is None:
            return ["--insecure"]
        t = self.tls_dir
        flags = ["--ssl-ca-certfile", str(t / "ca.crt"), "--ssl-certfile", str(t / "server.pem"), "--ssl-keyfile", str(t / "server.key")]
        return flags + (["--enable-supernode-auth"] if self.supernode_auth else [])

    def superlink_command(self) -> list[str]:
        return [
            "flower-superlink",
            *self._tls_flags(),
            "--disable-runtime-dependency-installation",
            "--fleet-api-address",
            f"{self.fleet_host}:{self.fleet_port}",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.http_port),
        ]

    def start(self) -> None:
        link = self._spawn("superlink", self.superlink_command(), self.workdir / "superlink", netns=self.superlink_netns)
        log_file = self.workdir / "superlink.log"
        if self.nodes:  # (a simulation SuperLink has no Fleet API)
            wait_for_port(self.fleet_port, 60, link, "flower-superlink", log_file, host=self.fleet_host, netns=self.superlink_netns)
        wait_for_port(self.http_port, 60, link, "flower-superlink", log_file, netns=self.superlink_netns)
        self._write_cli_config()
        if self.supernode_auth:
            for i in range(len(self.nodes)):
                self._register(self.tls_dir / f"supernode-{i}.key.pub")
        for i in range(len(self.nodes)):
            self.start_node(i)

    def start_node(self, i: int) -> subprocess.Popen:
        """Start SuperNode ``i`` (again, after :meth:`stop_node`): the same node-config and
        FLWR_HOME, so what it keeps on disk is there; Flower gives it a new node id. A
        restart logs to ``supernode-<i>.<start>.log``."""
        starts = self._node_starts.get(i, 0)
        self._node_starts[i] = starts + 1
        node = self.nodes[i]
        kind = node.supernode or self.supernode
        host = node.dial_host or self.fleet_host
        measure = ["--telemetry-address", f"{host}:{self.collector_port}", *self.supernode_flags] if kind == "stamen" else []
        self._node_procs[i] = self._spawn(
            f"supernode-{i}" + (f".{starts}" if starts else ""),
            [
                SUPERNODES[kind],
                *measure,
                *self._node_security_flags(i),
                "--superlink",
                f"{host}:{self.fleet_port}",
                "--port",
                str(free_port()),
                "--node-config",
                node.node_config(),
            ],
            self.workdir / f"supernode-{i}",
            netns=node.netns,
            cgroups=tuple(str(c) for c in node.cgroups),
            env=node.env,
        )
        return self._node_procs[i]

    def stop_node(self, i: int, sig: int = signal.SIGKILL) -> None:
        """Stop SuperNode ``i`` and everything it started (its ClientApps); by default as a
        crash does, with SIGKILL: no goodbye to the SuperLink."""
        import psutil

        proc = self._node_procs.pop(i)
        with contextlib.suppress(psutil.Error):
            family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            for p in family:
                with contextlib.suppress(psutil.Error):
                    p.send_signal(sig)
            psutil.wait_procs(family, timeout=10)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        self.procs = [p for p in self.procs if p[1] is not proc]

    def _node_security_flags(self, i: int) -> list[str]:
        if self.tls_dir is None:
            return ["--insecure"]
        flags = ["--root-certificates", str(self.tls_dir / "ca.crt")]
        return flags + (["--auth-supernode-private-key", str(self.tls_dir / f"supernode-{i}.key")] if self.supernode_auth else [])

    def _write_cli_config(self) -> None:
        """$FLWR_HOME/config.toml of the `flwr` CLI: one connection, `local-deployment`."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        security = "insecure = true" if self.tls_dir is None else f'root-certificates = "{self.tls_dir / "ca.crt"}"'
        (self.flwr_home / "config.toml").write_text(
            '[superlink]\ndefault = "local-deployment"\n\n'
            f'[superlink.local-deployment]\naddress = "127.0.0.1:{self.http_port}"\n{security}\n'
        )

    def _register(self, public_key: Path) -> None:
        """``flwr supernode register``: the SuperLink will accept the node holding this key."""
        out = subprocess.run(
            [*_in_netns(self.superlink_netns), "flwr", "supernode", "register", str(public_key), "local-deployment"],
            cwd=self.app_dir, env={**self.env, "FLWR_HOME": str(self.flwr_home)}, capture_output=True, text=True, timeout=120,
        )
        if out.returncode != 0:
            raise RuntimeError(f"flwr supernode register {public_key} failed: {out.stdout.strip()} {out.stderr.strip()}")

    def run(self, run_config: list[str] = (), *, echo=print, timeout: float = 3600) -> int:
        """``flwr run`` the app, streaming its log; returns Flower's run id.

        ``run_config``: overrides, each 'k=v ...' or the path of a TOML file (see conf/).
        """
        collector = f'measure.collector="{self.collector_address}"'
        if self.tls_dir is not None:  # the collector serves the SuperLink's certificate; nodes trust it with ca.crt
            collector += f' measure.collector-certfile="{self.tls_dir / "server.pem"}" measure.collector-keyfile="{self.tls_dir / "server.key"}"'
        app = stage_app(self.app_dir, self.workdir / "app")
        cmd = [*_in_netns(self.superlink_netns), "flwr", "run", str(app), "local-deployment", "--stream"]
        cmd += ["--run-config", merge_overrides([collector, *run_config]), *self.run_flags()]
        env = {**self.env, "FLWR_HOME": str(self.flwr_home)}
        proc = subprocess.Popen(
            cmd, cwd=self.app_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        self.procs.append(("flwr-run", proc, self.workdir / "flwr-run.log"))
        run_id = None
        deadline = time.monotonic() + timeout
        with open(self.workdir / "flwr-run.log", "w") as log:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                log.flush()
                echo(line.rstrip("\n"))
                if run_id is None and (m := re.search(r"run (?:ID )?(\d{6,})", line, re.IGNORECASE)):
                    run_id = int(m.group(1))
                if time.monotonic() > deadline:
                    raise TimeoutError(f"flwr run exceeded {timeout:.0f} s")
        if proc.wait() != 0:
            raise RuntimeError(f"flwr run exited with code {proc.returncode}; see {self.workdir / 'flwr-run.log'}")
        if run_id is None:
            raise RuntimeError(f"could not find the run id in flwr run's output; see {self.workdir / 'flwr-run.log'}")
        return run_id

    def run_flags(self) -> list[str]:
        """Extra ``flwr run`` flags (the simulation's federation config)."""
        return []

    def run_status(self, run_id: int) -> str:
        out = subprocess.run(
            [*_in_netns(self.superlink_netns), "flwr", "ls", "local-deployment", "--run-id", str(run_id), "--format", "json"],
            cwd=self.app_dir,
            env={**self.env, "FLWR_HOME": str(self.flwr_home)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        try:
            runs = json.loads(out.stdout).get("runs", [])
            return str(runs[0].get("status", "unknown")) if runs else "unknown"
        except (json.JSONDecodeError, AttributeError):
            return "unknown"

    def stop(self) -> None:
        """Stop every process we started and everything they started.

        Descendants are collected first (a SuperNode's ClientApp or the SuperLink's
        ServerApp may run in a session of its own, out of reach of its parent's group),
        then SIGTERM goes to each process group and each descendant, and whatever is
        still alive after 10 s gets SIGKILL.
        """
        import psutil

        family: dict[int, psutil.Process] = {}
        for _, proc, _ in self.procs:
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(proc.pid)
                for p in [root, *root.children(recursive=True)]:
                    family[p.pid] = p
        for _, proc, _ in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for p in family.values():
            with contextlib.suppress(psutil.Error):
                p.terminate()
        _, alive = psutil.wait_procs(list(family.values()), timeout=10)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(alive, timeout=5)
        for _, proc, _ in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self.procs.clear()


def heterogeneous_nodes(
    num_nodes: int,
    ranks: list[int],
    device_classes: list[str],
    num_threads: int | None,
    networks: list[str] = (),
    supernodes: list[str] = (),
) -> list[NodeSpec]:
    return [
        NodeSpec(
            partition_id=i,
            num_partitions=num_nodes,
            device_class=device_classes[i % len(device_classes)] if device_classes else None,
            lora_rank=ranks[i % len(ranks)] if ranks else None,
            num_threads=num_threads,
            extra={"network": networks[i % len(networks)]} if networks else {},
            supernode=supernodes[i % len(supernodes)] if supernodes else None,
        )
        for i in range(num_nodes)
    ]

