"""``stamen``: the project's command line.

    stamen local    run the app on a real SuperLink + N SuperNodes on 127.0.0.1
    stamen simulate run the app on N virtual SuperNodes in Flower's simulation engine (Ray)
    stamen report   summary and plots of where each round's time went
"""

from __future__ import annotations

import argparse
import csv
import json
import signal
import sys
import time
from pathlib import Path


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.replace(",", " ").split()]


def _names(text: str) -> list[str]:
    return [x for x in text.replace(",", " ").split() if x]


def cmd_local(args: argparse.Namespace) -> int:
    from deploy.local import SUPERNODES, LocalDeployment, heterogeneous_nodes, merge_overrides

    output = Path(args.output).resolve()
    workdir = output / "_deploy" / time.strftime("%Y%m%d-%H%M%S")
    kinds = _names(args.supernode)
    if not kinds or any(k not in SUPERNODES for k in kinds):
        print(f"[stamen] error: --supernode takes {' or '.join(SUPERNODES)} (a list is cycled over nodes)", file=sys.stderr)
        return 2
    nodes = heterogeneous_nodes(
        args.nodes, _ints(args.ranks), _names(args.device_classes), args.threads, _names(args.networks), kinds
    )
    supernode = "/".join(SUPERNODES[k] for k in dict.fromkeys(kinds))
    overrides = merge_overrides([*args.run_config, f'output.dir="{output}" strategy.min-nodes={args.nodes}'])
    print(f"[stamen] starting flower-superlink and {args.nodes} {supernode} processes on 127.0.0.1", flush=True)
    for i, node in enumerate(nodes):
        print(f"[stamen]   supernode-{i}: --node-config '{node.node_config()}'", flush=True)
    print(f"[stamen] process logs: {workdir}", flush=True)
    return _run_and_report(LocalDeployment(nodes, workdir=workdir), overrides, output, workdir, args.timeout)


def cmd_simulate(args: argparse.Namespace) -> int:
    from deploy.local import merge_overrides
    from deploy.simulation import SimulationDeployment

    output = Path(args.output).resolve()
    workdir = output / "_deploy" / time.strftime("%Y%m%d-%H%M%S")
    overrides = merge_overrides([*args.run_config, f'output.dir="{output}" strategy.min-nodes={args.nodes}'])
    print(f"[stamen] starting flower-superlink --simulation with {args.nodes} virtual SuperNodes", flush=True)
    print(f"[stamen] process logs: {workdir}", flush=True)
    deployment = SimulationDeployment(args.nodes, workdir=workdir, client_cpus=args.client_cpus)
    return _run_and_report(deployment, overrides, output, workdir, args.timeout)


def _run_and_report(deployment, overrides: str, output: Path, workdir: Path, timeout: float) -> int:
    """Run the app on a deployment, check Flower's verdict, print the last round and the report."""

    def on_sigterm(signum, frame):  # turn SIGTERM into the same clean shutdown as Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    t0 = time.monotonic()
    try:
        with deployment as dep:
            run_id = dep.run([overrides], echo=lambda line: print(line, flush=True), timeout=timeout)
            status = dep.run_status(run_id)
    except KeyboardInterrupt:
        print("\n[stamen] interrupted: all processes stopped", file=sys.stderr)
        return 130
    run_dir = output / str(run_id)
    print(f"[stamen] run {run_id} finished ({status}) in {time.monotonic() - t0:.0f} s; all processes stopped", flush=True)
    if "failed" in status.lower():
        print(f"[stamen] error: the run failed; the ServerApp's error is above and in {workdir}/flwr-run.log", file=sys.stderr)
        return 1
    if not (run_dir / "metrics.csv").is_file():
        print(f"[stamen] error: {run_dir}/metrics.csv was not written; see {workdir}/flwr-run.log", file=sys.stderr)
        return 1
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    if rows:
        last = {k: v for k, v in rows[-1].items() if v != ""}
        print(f"[stamen] final round: {json.dumps(last)}", flush=True)
    print(f"[stamen] run directory: {run_dir}", flush=True)
    if (run_dir / "clients.csv").is_file():
        from measurements.report import report

        report([run_dir], echo=lambda line: print(f"[stamen] {line}", flush=True))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from measurements.report import report

    try:
        report(args.run_dirs, labels=_names(args.labels) or None, out=args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"stamen report: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stamen", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    local = sub.add_parser("local", help="run on a real SuperLink + SuperNodes on 127.0.0.1")
    local.add_argument("--nodes", type=int, default=4)
    local.add_argument("--ranks", default="4,8,8,16", help="node-config lora-rank per node (cycled); '' = from device class")
    local.add_argument(
        "--device-classes", default="raspberry-pi,jetson,jetson,nvidia-gpu", help="node-config device-class per node (cycled)"
    )
    local.add_argument("--threads", type=int, default=1, help="torch threads per node (node-config num-threads)")
    local.add_argument(
        "--networks", default="loopback", help="node-config network label per node (cycled); reports group by it"
    )
    local.add_argument(
        "--supernode",
        default="stamen",
        help="'stamen' (stamen-supernode: transfer timing + telemetry) or 'flower' (plain flower-supernode); "
        "a list is cycled over nodes",
    )
    local.add_argument("--output", default="runs", help="where run directories go")
    local.add_argument(
        "--run-config", action="append", default=[], help="overrides: 'k=v ...' or a TOML file (repeatable)"
    )
    local.add_argument("--timeout", type=float, default=3600.0)
    local.set_defaults(func=cmd_local)
    sim = sub.add_parser("simulate", help="run on N virtual SuperNodes in Flower's simulation engine (Ray)")
    sim.add_argument("--nodes", type=int, default=10)
    sim.add_argument("--client-cpus", type=int, default=1, help="CPUs Ray reserves per ClientApp")
    sim.add_argument("--output", default="runs", help="where run directories go")
    sim.add_argument(
        "--run-config", action="append", default=[], help="overrides: 'k=v ...' or a TOML file (repeatable)"
    )
    sim.add_argument("--timeout", type=float, default=3600.0)
    sim.set_defaults(func=cmd_simulate)
    rep = sub.add_parser("report", help="summary and PNGs of a run's phase timings; several runs are compared")
    rep.add_argument("run_dirs", nargs="+", help="runs/<run-id> directories")
    rep.add_argument("--labels", default="", help="a name per run dir, comma-separated (default: its network labels)")
    rep.add_argument("--out", default=None, help="where the comparison goes (default: <first run's parent>/comparison)")
    rep.set_defaults(func=cmd_report)
    args = parser.parse_args(argv)
    if args.command in ("local", "simulate") and args.nodes < 1:
        parser.error("--nodes must be at least 1")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
