"""The same ServerApp and ClientApp in Flower's simulation engine (Ray), on one machine.

A ``flower-superlink --simulation`` (own FLWR_HOME, free ports) runs the app with N
virtual SuperNodes: ``flwr run . <conn> --federation-config num-supernodes=N``. This is
how studies with many clients stay fast; nothing crosses a network, so the
instrumentation records what it can (train phases, resources, aggregation, e2e) and
marks transfers ``unavailable`` (docs/measurements.md).

In simulation a node's ``node_config`` holds only ``partition-id`` and
``num-partitions``: per-node properties (device class, LoRA rank) come from the run
config instead.
"""

from __future__ import annotations

from pathlib import Path

from deploy.local import PROJECT_ROOT, LocalDeployment


class SimulationDeployment(LocalDeployment):
    """Context manager like LocalDeployment; ``run()`` executes the app on ``num_nodes``
    virtual SuperNodes. ``client_cpus``: CPUs Ray reserves per ClientApp (so at most
    ``cores / client_cpus`` clients train at once)."""

    def __init__(self, num_nodes: int, *, workdir: Path, app_dir: Path = PROJECT_ROOT, client_cpus: int = 1) -> None:
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be at least 1, got {num_nodes}")
        if client_cpus < 1:
            raise ValueError(f"client_cpus must be at least 1, got {client_cpus}")
        super().__init__([], workdir=workdir, app_dir=app_dir)
        self.num_nodes = num_nodes
        self.client_cpus = client_cpus
        self.collector_address = ""  # no SuperNode streams telemetry: events travel in replies

    def superlink_command(self) -> list[str]:
        return [
            "flower-superlink",
            "--insecure",
            "--simulation",
            "--disable-runtime-dependency-installation",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.http_port),
            "--control-api-address",
            f"127.0.0.1:{self.fleet_port}",  # (the port would otherwise be a fixed default)
        ]

    def run_flags(self) -> list[str]:
        return [
            "--federation-config",
            f"num-supernodes={self.num_nodes} client-resources-num-cpus={self.client_cpus}",
        ]
