"""``stamen``: the project's command line.

    stamen local    run the app on a real SuperLink + N SuperNodes on 127.0.0.1
    stamen simulate run the app on N virtual SuperNodes in Flower's simulation engine (Ray)
    stamen testbed  the emulated testbed: namespaces, shaped links, delay, CPU/memory limits
    stamen report   summary and plots of where each round's time went
    stamen calibrate fit a latency model from measured runs, for simulate --latency-model (docs/scale.md)
    stamen resume   continue a killed run from its last checkpoint (docs/checkpoints.md)
    stamen export   a run's model as a Hugging Face directory
    stamen device   the device profile this machine reports (class, rank, memory, CUDA)
    stamen study    the accuracy studies' tables and plots (docs/lora-baselines.md, docs/early-exit.md)
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import signal
import sys
import time
from pathlib import Path

from device_runtime.polls import poll_seconds, transfer_concurrency


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.replace(",", " ").split()]


def _names(text: str) -> list[str]:
    return [x for x in text.replace(",", " ").split() if x]


class RunConfigError(Exception):
    """A run config that cannot start a run: one line, naming the key."""


def checked_run_config(items: list[str], output_flag: str | None) -> tuple[list[str], Path]:
    """The run-config overrides, validated with Stamen's own parser against the app's
    defaults before any process starts, and the output directory: ``--output``, else the
    run config's ``output.dir``, else ``runs``. Raises RunConfigError naming the problem."""
    items, output, _ = checked_config(items, output_flag)
    return items, output


def checked_config(items: list[str], output_flag: str | None):
    """:func:`checked_run_config`, and the resolved StamenConfig."""
    import tomllib

    from flwr.common.config import parse_config_args

    from deploy.local import PROJECT_ROOT
    from stamen.config import ConfigError, StamenConfig

    merged: dict = {}
    for item in items:
        try:
            merged.update(parse_config_args([item]))
        except FileNotFoundError as err:
            raise RunConfigError(f"--run-config: no such file: {err.filename}") from None
        except Exception as err:  # Flower's parser: click's exception for a bad 'k=v' string, a TOML error for a file
            detail = getattr(err, "message", None) or str(err)
            if item.endswith(".toml") and Path(item).is_file():
                raise RunConfigError(f"--run-config {item}: the TOML file does not parse ({detail})") from None
            raise RunConfigError(f"--run-config {item!r}: not 'key=value ...' pairs with values bool, int, float or \"string\" ({detail})") from None
    defaults = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    output = Path(output_flag or merged.get("output.dir") or "runs").resolve()
    try:
        cfg = StamenConfig.from_run_config({**defaults, **merged, "output.dir": str(output)})
    except ConfigError as err:
        raise RunConfigError(str(err)) from None
    return items, output, cfg


def cmd_local(args: argparse.Namespace) -> int:
    from deploy.local import SUPERNODES, LocalDeployment, heterogeneous_nodes, merge_overrides

    items, output = checked_run_config(args.run_config, args.output)
    workdir = output / "_deploy" / time.strftime("%Y%m%d-%H%M%S")
    kinds = _names(args.supernode)
    if not kinds or any(k not in SUPERNODES for k in kinds):
        print(f"[stamen] error: --supernode takes {' or '.join(SUPERNODES)} (a list is cycled over nodes)", file=sys.stderr)
        return 2
    nodes = heterogeneous_nodes(
        args.nodes, _ints(args.ranks), _names(args.device_classes), args.threads, _names(args.networks), kinds
    )
    nodes = [dataclasses.replace(n, extra={**n.extra, "state-dir": str(node_state_dir(output, n.partition_id))}) for n in nodes]
    supernode = "/".join(SUPERNODES[k] for k in dict.fromkeys(kinds))
    runtime, grid_poll = _runtime_options(args)
    overrides = merge_overrides(
        [f"strategy.poll-interval={grid_poll}", *items, f'output.dir="{output}" strategy.min-nodes={args.nodes}']
    )
    print(f"[stamen] starting flower-superlink and {args.nodes} {supernode} processes on 127.0.0.1", flush=True)
    for i, node in enumerate(nodes):
        print(f"[stamen]   supernode-{i}: --node-config '{node.node_config()}'", flush=True)
    print(f"[stamen] runtime: {' '.join(runtime) or 'warm, default polls'}; ServerApp poll {grid_poll} s", flush=True)
    print(f"[stamen] process logs: {workdir}", flush=True)
    deployment = LocalDeployment(nodes, workdir=workdir, supernode_flags=runtime)
    return _run(deployment, overrides, output, workdir, args.timeout)[0]


def _runtime_options(args: argparse.Namespace) -> tuple[list[str], float]:
    """The stamen-supernode runtime flags and the ServerApp's poll (docs/runtime.md):
    with --no-warm, Flower's polls unless a poll is given."""
    flags = ["--no-warm"] if args.no_warm else []
    for name in ("idle_poll", "reply_poll", "task_poll", "transfer_concurrency"):
        if (value := getattr(args, name)) is not None:
            flags += [f"--{name.replace('_', '-')}", str(value)]
    grid = args.grid_poll if args.grid_poll is not None else (3.0 if args.no_warm else 0.2)
    return flags, grid


def cmd_simulate(args: argparse.Namespace) -> int:
    from deploy.local import merge_overrides
    from deploy.simulation import SimulationDeployment

    clock = simulated_clock_overrides(args)
    items, output, cfg = checked_config([*args.run_config, *clock], args.output)
    workdir = output / "_deploy" / time.strftime("%Y%m%d-%H%M%S")
    # every virtual node is there from the start; a round samples strategy.fraction-train of them
    sampled = min(args.nodes, max(cfg.strategy.min_nodes, math.ceil(args.nodes * cfg.strategy.fraction_train)))
    # the profile query runs a ClientApp per virtual node, about 0.25 s each per Ray worker on
    # this machine: 1,000 nodes need longer than the default 120 s (it returns when all answered)
    query = max(cfg.strategy.query_timeout, float(args.nodes))
    overrides = merge_overrides([*items, f'output.dir="{output}" strategy.min-nodes={sampled} strategy.query-timeout={query}'])
    print(f"[stamen] starting flower-superlink --simulation with {args.nodes} virtual SuperNodes, {sampled} per round", flush=True)
    print(f"[stamen] process logs: {workdir}", flush=True)
    deployment = SimulationDeployment(args.nodes, workdir=workdir, client_cpus=args.client_cpus)
    return _run(deployment, overrides, output, workdir, args.timeout)[0]


def simulated_clock_overrides(args: argparse.Namespace) -> list[str]:
    """--latency-model / --fleet as run-config overrides, checked against each other
    before anything starts; sets --nodes to the fleet's size when it was not given."""
    from measurements.clock import Fleet
    from measurements.latency_model import LatencyModel, LatencyModelError

    if not args.latency_model and not args.fleet:
        if args.nodes is None:
            args.nodes = 10
        return []
    if not (args.latency_model and args.fleet):
        raise RunConfigError("--latency-model and --fleet go together: the simulated clock needs a model and a fleet")
    path = Path(args.latency_model).resolve()
    try:
        model = LatencyModel.load(path)
        fleet = Fleet.parse(args.fleet, default_network=args.network)
        fleet.check(model)
    except LatencyModelError as err:
        raise RunConfigError(str(err)) from None
    if args.nodes is None:
        args.nodes = fleet.size
    elif args.nodes != fleet.size:
        raise RunConfigError(f"--nodes {args.nodes} but the fleet has {fleet.size}: leave --nodes out, or make them equal")
    return [f'simulation.latency-model="{path}" simulation.fleet="{args.fleet}" simulation.network="{args.network}"']


def cmd_calibrate(args: argparse.Namespace) -> int:
    from measurements.latency_model import LatencyModelError, calibrate

    try:
        model, rows = calibrate([Path(d) for d in args.run_dirs])
    except LatencyModelError as err:
        print(f"[stamen] error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    model.save(out)
    print(f"[stamen] fitted on {len(rows)} client-rounds of {len(args.run_dirs)} runs ({model.workload.get('model.path')}, "
          f"{model.steps} local steps)")
    for name, d in sorted(model.devices.items()):
        print(f"[stamen]   device {name}: start-up {d.startup_s:.2f} s, step {d.step_s:.3f} s + {d.step_per_rank_s:.4f} s/rank "
              f"{d.step_per_prune_s:+.3f} s x pruning ratio"
              + "".join(f", {s} {v:+.3f} s/step" for s, v in sorted(d.step_by_strategy.items()))
              + f", wait {d.wait_s:.2f} s ({d.rows} rows)")
    for name in sorted(model.down):
        down, up = model.down[name], model.up[name]
        print(f"[stamen]   network {name}: down {down.mbit:.1f} Mbit/s + {down.latency_s * 1e3:.0f} ms ({down.fitted}), "
              f"up {up.mbit:.1f} Mbit/s + {up.latency_s * 1e3:.0f} ms ({up.fitted})")
    print(f"[stamen]   server part of a round: {model.server_s:.2f} s")
    print("[stamen] fit error (median |predicted - measured| / measured): "
          + ", ".join(f"{k.removesuffix('_s')} {v:.1%}" for k, v in model.error.items()))
    print(f"[stamen] wrote {out}")
    return 0


def node_state_dir(output: Path, partition_id: int) -> Path:
    """What a loopback node keeps on its "disk" (its DP ledger), by partition, under the
    output directory: the same after a resume, as a device's disk would be."""
    return output / "_state" / f"partition-{partition_id}"


def resume_plan(run_dir: Path, threads: int | None) -> tuple[list, dict]:
    """The SuperNodes and run config that continue ``run_dir`` on loopback: one node per
    profiled node of the run (its partition, device class, rank, network), and the run's
    own run-config.toml with ``checkpoint.resume-from`` set. RunConfigError if the
    directory cannot be resumed (no run, no checkpoint)."""
    import tomllib

    from deploy.local import NodeSpec
    from server_app import checkpoint
    from server_app.run_dir import RUN_CONFIG_FILE

    if not (run_dir / RUN_CONFIG_FILE).is_file() or not (run_dir / "profiles.json").is_file():
        raise RunConfigError(f"{run_dir}: not a run directory of this version of Stamen (no {RUN_CONFIG_FILE} or profiles.json)")
    try:
        saved = checkpoint.latest(run_dir)
    except checkpoint.CheckpointError as err:
        raise RunConfigError(str(err)) from None
    config = tomllib.loads((run_dir / RUN_CONFIG_FILE).read_text())
    config = {k: v for k, v in config.items() if not k.startswith(("measure.collector", "output.dir"))}  # this deployment's
    config["checkpoint.resume-from"] = str(run_dir)
    profiles = json.loads((run_dir / "profiles.json").read_text())
    nodes = []
    for profile in profiles.values():
        if "partition-id" not in profile:
            continue  # a node whose profile query failed: it was left out of the run
        extra = {k: profile[k] for k in ("network", "max-exit") if k in profile}
        extra["state-dir"] = str(node_state_dir(run_dir.parent, int(profile["partition-id"])))
        nodes.append(NodeSpec(int(profile["partition-id"]), int(profile.get("num-partitions", len(profiles))),
                              device_class=profile.get("device-class"), lora_rank=profile.get("lora-rank"),
                              num_threads=threads, extra=extra))
    if not nodes:
        raise RunConfigError(f"{run_dir}/profiles.json names no node with a partition-id to start again")
    print(f"[stamen] resuming {run_dir.name} after round {saved.server_round} ({saved.path})", flush=True)
    return sorted(nodes, key=lambda n: n.partition_id), config


def cmd_resume(args: argparse.Namespace) -> int:
    from deploy.local import LocalDeployment, merge_overrides

    run_dir = Path(args.run_dir).resolve()
    try:
        nodes, config = resume_plan(run_dir, args.threads)
        items, _ = checked_run_config([" ".join(f"{k}={json.dumps(v)}" for k, v in config.items()), *args.run_config], str(run_dir.parent))
    except RunConfigError as err:
        print(f"[stamen] error: {err}", file=sys.stderr)
        return 2
    overrides = merge_overrides([*items, f'output.dir="{run_dir.parent}" strategy.min-nodes={len(nodes)}'])
    workdir = run_dir.parent / "_deploy" / time.strftime("%Y%m%d-%H%M%S")
    print(f"[stamen] starting flower-superlink and {len(nodes)} stamen-supernode processes on 127.0.0.1; process logs: {workdir}", flush=True)
    deployment = LocalDeployment(nodes, workdir=workdir)
    return _run(deployment, overrides, run_dir.parent, workdir, args.timeout, run_dir=run_dir)[0]


def cmd_export(args: argparse.Namespace) -> int:
    """``stamen export RUN_DIR [--round N] --format merged|adapter --out DIR``."""
    from server_app.export import ExportError, export_run

    try:
        written = export_run(Path(args.run_dir), server_round=args.round, fmt=args.format, out=Path(args.out))
    except ExportError as err:
        print(f"[stamen] error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(f"[stamen] wrote {path}", flush=True)
    return 0


def _run(deployment, overrides: str, output: Path, workdir: Path, timeout: float, *, run_dir: Path | None = None) -> tuple[int, Path | None]:
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
        return 130, None
    run_dir = run_dir or output / str(run_id)
    print(f"[stamen] run {run_id} finished ({status}) in {time.monotonic() - t0:.0f} s; all processes stopped", flush=True)
    if "failed" in status.lower():
        cause = last_exception(workdir / "flwr-run.log")
        print(f"[stamen] error: the run failed{': ' + cause if cause else ''}", file=sys.stderr)
        print(f"[stamen] the ServerApp's log is above and in {workdir}/flwr-run.log", file=sys.stderr)
        return 1, run_dir
    if not (run_dir / "metrics.csv").is_file():
        print(f"[stamen] error: {run_dir}/metrics.csv was not written; see {workdir}/flwr-run.log", file=sys.stderr)
        return 1, run_dir
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    if rows:
        last = {k: v for k, v in rows[-1].items() if v != ""}
        print(f"[stamen] final round: {json.dumps(last)}", flush=True)
    print(f"[stamen] run directory: {run_dir}", flush=True)
    if (run_dir / "clients.csv").is_file():
        from measurements.report import report

        report([run_dir], echo=lambda line: print(f"[stamen] {line}", flush=True))
    return 0, run_dir


def last_exception(log: Path) -> str:
    """The last ``SomeError: message`` line of a log with Python tracebacks ('' if none)."""
    import re

    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    found = [line.strip() for line in lines if re.match(r"^\s*[A-Za-z_][\w.]*(Error|Exception|Exit): ", line)]
    return found[-1] if found else ""


def _testbed_nodes(args: argparse.Namespace, network: str | None = None):
    from deploy.testbed import TestbedNode, load_profiles

    networks, devices = load_profiles(args.profiles)
    wanted_devices = _names(args.devices)
    wanted_networks = [network] if network else _names(args.network)
    for kind, wanted, known in (("device", wanted_devices, devices), ("network", wanted_networks, networks)):
        unknown = [w for w in wanted if w not in known]
        if not wanted or unknown:
            raise ValueError(f"unknown {kind} profile(s) {unknown or wanted}; {args.profiles} defines {', '.join(known)}")
    n = args.nodes or len(wanted_devices)
    ranks = _ints(args.ranks)
    if any(r < 1 for r in ranks):
        raise ValueError(f"--ranks must be positive integers, got {args.ranks!r}")
    nodes = []
    for i in range(n):
        device = devices[wanted_devices[i % len(wanted_devices)]]
        if ranks:  # the node's node-config lora-rank, in place of its device profile's
            device = dataclasses.replace(device, lora_rank=ranks[i % len(ranks)])
        nodes.append(TestbedNode(device, networks[wanted_networks[i % len(wanted_networks)]]))
    return nodes


def _check_emulation(args: argparse.Namespace, nodes) -> None:
    """--emulate-compute: the model file reads, and has every device of the testbed."""
    from measurements.latency_model import LatencyModel, LatencyModelError

    if args.loopback:
        raise ValueError("--emulate-compute needs the namespaced testbed (its links are what stays real), not --loopback")
    args.emulate_compute = str(Path(args.emulate_compute).resolve())
    try:
        model = LatencyModel.load(args.emulate_compute)
    except LatencyModelError as err:
        raise ValueError(str(err)) from None
    try:
        for name in sorted({n.device.name for n in nodes}):
            model.device(name)
    except LatencyModelError as err:
        raise ValueError(f"--emulate-compute {args.emulate_compute}: {err}; calibrate from runs with that device") from None


def _testbed_deployment(args: argparse.Namespace, nodes, workdir: Path):
    """The namespaced testbed, or with --loopback the same node-configs on 127.0.0.1."""
    if args.loopback:
        from deploy.local import LocalDeployment, NodeSpec

        specs = [NodeSpec(i, len(nodes), device_class=n.device.device_class, lora_rank=n.device.lora_rank,
                          num_threads=args.threads or 1, extra={"network": n.network.name, "testbed-device": n.device.name})
                 for i, n in enumerate(nodes)]
        return LocalDeployment(specs, workdir=workdir)
    from deploy.testbed import Testbed

    flags = ["--transfer-concurrency", str(args.transfer_concurrency)] if args.transfer_concurrency else []
    return Testbed(nodes, workdir=workdir, threads=args.threads, supernode_flags=flags, emulate=args.emulate_compute)


def _describe(nodes, loopback: bool) -> None:
    mode = "loopback (no shaping, no limits)" if loopback else "network namespaces, tbf, delay proxy, cgroups"
    print(f"[stamen] testbed: {len(nodes)} nodes, {mode}", flush=True)
    for i, n in enumerate(nodes):
        d, net = n.device, n.network
        print(f"[stamen]   node {i}: {d.name} ({d.cpus:g} CPUs, {d.memory_gib:g} GiB, rank {d.lora_rank}) on {net.name} "
              f"({net.down_mbit:g}/{net.up_mbit:g} Mbit/s down/up, {net.delay_ms:g}+-{net.jitter_ms:g} ms one way)", flush=True)


def cmd_testbed(args: argparse.Namespace) -> int:
    from deploy import testbed
    from deploy.local import merge_overrides

    if args.action == "down":
        gone = testbed.teardown()
        for kind, items in gone.items():
            print(f"[stamen] removed {len(items)} {kind}" + (f": {', '.join(items)}" if items else ""), flush=True)
        return 0
    if not args.loopback and (reason := testbed.available()) is not None:
        print(f"[stamen] error: the emulated testbed cannot run here: {reason}.\n"
              "[stamen] Run it as root, or pass --loopback to run the same nodes on 127.0.0.1 without shaping or limits.",
              file=sys.stderr)
        return 2
    items, output = checked_run_config(args.run_config, args.output)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    try:
        networks = _names(args.network) if args.action == "compare" else [None]
        plans = [(net, _testbed_nodes(args, net)) for net in networks]
        if args.emulate_compute:
            _check_emulation(args, [n for _, nodes in plans for n in nodes])
    except ValueError as err:
        print(f"[stamen] error: {err}", file=sys.stderr)
        return 2
    if args.action == "up":
        nodes = plans[0][1]
        _describe(nodes, args.loopback)
        workdir = output / "_deploy" / f"testbed-{stamp}"
        try:
            with _testbed_deployment(args, nodes, workdir) as bed:
                dep = bed if args.loopback else bed.deployment
                ns = "" if args.loopback else f"ip netns exec {dep.superlink_netns} "
                print(f"[stamen] up. From another shell:\n  FLWR_HOME={dep.flwr_home} {ns}flwr run . local-deployment --stream"
                      f" --run-config 'measure.collector=\"{dep.collector_address}\" strategy.min-nodes={len(nodes)}'\n"
                      f"[stamen] Ctrl-C tears everything down.", flush=True)
                signal.pause()
        except KeyboardInterrupt:
            print("\n[stamen] testbed down", flush=True)
        return 0
    run_dirs, labels = [], []
    for net, nodes in plans:
        _describe(nodes, args.loopback)
        workdir = output / "_deploy" / f"testbed-{stamp}" / (net or "run")
        overrides = merge_overrides([*items, f'output.dir="{output}" strategy.min-nodes={len(nodes)}'])
        code, run_dir = _run(_testbed_deployment(args, nodes, workdir), overrides, output, workdir, args.timeout)
        if code != 0:
            return code
        run_dirs.append(run_dir)
        labels.append(net or nodes[0].network.name)
    if len(run_dirs) > 1:
        from measurements.report import report

        report(run_dirs, labels=labels, out=output / f"comparison-{stamp}",
               echo=lambda line: print(f"[stamen] {line}", flush=True))
    return 0


def cmd_device(args: argparse.Namespace) -> int:
    """What a SuperNode on this machine tells the server, and the LoRA rank it gets."""
    import tomllib

    from flwr.common.config import parse_config_args

    from client_app.device import detect_profile
    from server_app.profiles import ranks_from_profiles
    from stamen.config import StamenConfig

    try:
        node_config = parse_config_args([args.node_config]) if args.node_config else {}
        profile = detect_profile(node_config)
        defaults = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
        lora = StamenConfig.from_run_config(defaults["tool"]["flwr"]["app"]["config"]).lora
        ranks, left_out = ranks_from_profiles({0: profile}, lora)
        if left_out:
            raise ValueError(left_out[0])
        profile["lora-rank"] = ranks[0]
        profile.pop("transport", None)  # (this command is not a SuperNode)
    except (ValueError, OSError) as err:
        print(f"stamen device: {err}", file=sys.stderr)
        return 2
    print(json.dumps(profile, indent=2, default=str))
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from .study import study

    try:
        study(args.dirs, target=args.target)
    except FileNotFoundError as err:
        print(f"stamen study: {err}", file=sys.stderr)
        return 2
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
    local.add_argument("--output", default=None, help="where run directories go (default: the run config's output.dir, else runs)")
    local.add_argument(
        "--run-config", action="append", default=[], help="overrides: 'k=v ...' or a TOML file (repeatable)"
    )
    local.add_argument("--timeout", type=float, default=3600.0)
    local.add_argument("--no-warm", action="store_true", help="stamen-supernode --no-warm: Flower's executor and polls (docs/runtime.md)")
    for poll in ("idle", "reply", "task"):
        local.add_argument(f"--{poll}-poll", type=poll_seconds, default=None, help=f"stamen-supernode --{poll}-poll (seconds)")
    local.add_argument("--transfer-concurrency", type=transfer_concurrency, default=None,
                       help="stamen-supernode --transfer-concurrency: object RPCs in flight per transfer (docs/transfers.md)")
    local.add_argument(
        "--grid-poll", type=poll_seconds, default=None, help="the ServerApp's poll, strategy.poll-interval (default 0.2; 3 with --no-warm)"
    )
    local.set_defaults(func=cmd_local)
    sim = sub.add_parser("simulate", help="run on N virtual SuperNodes in Flower's simulation engine (Ray)")
    sim.add_argument("--nodes", type=int, default=None, help="virtual SuperNodes (default: the fleet's size, else 10)")
    sim.add_argument("--client-cpus", type=int, default=1, help="CPUs Ray reserves per ClientApp")
    sim.add_argument("--output", default=None, help="where run directories go (default: the run config's output.dir, else runs)")
    sim.add_argument(
        "--run-config", action="append", default=[], help="overrides: 'k=v ...' or a TOML file (repeatable)"
    )
    sim.add_argument("--timeout", type=float, default=3600.0)
    sim.add_argument("--latency-model", default="", help="a `stamen calibrate` file: run on its simulated clock (docs/scale.md)")
    sim.add_argument("--fleet", default="", help='with it: "raspberry-pi-4=600 jetson-orin-nano@5g=300" (device[@network]=count)')
    sim.add_argument("--network", default="wifi", help="the network of a --fleet entry without @network")
    sim.set_defaults(func=cmd_simulate)
    cal = sub.add_parser("calibrate", help="fit a latency model from measured runs (clients.csv), for simulate --latency-model")
    cal.add_argument("run_dirs", nargs="+", help="runs/<run-id> directories of real or testbed runs of one workload")
    cal.add_argument("--out", default="latency-model.json", help="the model file to write")
    cal.set_defaults(func=cmd_calibrate)
    bed = sub.add_parser(
        "testbed",
        help="the emulated testbed (root): namespaces, shaped links, delay, CPU/memory limits per device class",
        description="run: one experiment; compare: the same experiment on each --network (then a comparison report); "
        "up: bring it up until Ctrl-C; down: remove a crashed run's leftovers. Profiles: deploy/profiles.toml.",
    )
    bed.add_argument("action", choices=("run", "compare", "up", "down"))
    bed.add_argument("--devices", default="raspberry-pi-4,raspberry-pi-5,jetson-orin-nano,gpu-server",
                     help="device profiles, cycled over nodes")
    bed.add_argument("--network", default="wifi", help="network profile(s), cycled over nodes; compare: one run per profile")
    bed.add_argument("--nodes", type=int, default=0, help="default: one node per --devices entry")
    bed.add_argument("--profiles", default=str(Path(__file__).resolve().parent.parent / "deploy" / "profiles.toml"))
    bed.add_argument("--threads", type=int, default=0, help="torch threads per node (default: its CPU quota, rounded up)")
    bed.add_argument("--ranks", default="", help="node-config lora-rank per node (cycled), in place of the device profiles' (e.g. 64)")
    bed.add_argument("--transfer-concurrency", type=transfer_concurrency, default=None,
                     help="stamen-supernode --transfer-concurrency on every node (docs/transfers.md)")
    bed.add_argument("--loopback", action="store_true", help="no namespaces, shaping or limits (no root needed)")
    bed.add_argument("--emulate-compute", default=None, metavar="LATENCY_MODEL",
                     help="compute emulation: no CPU quotas; each node pads its training to this model's time for its device "
                          "(more device CPU than the host has; docs/scale.md)")
    bed.add_argument("--output", default=None, help="where run directories go (default: the run config's output.dir, else runs)")
    bed.add_argument("--run-config", action="append", default=[], help="overrides: 'k=v ...' or a TOML file (repeatable)")
    bed.add_argument("--timeout", type=float, default=3600.0)
    bed.set_defaults(func=cmd_testbed)
    res = sub.add_parser("resume", help="continue a killed `stamen local` run from its last checkpoint, on new loopback processes")
    res.add_argument("run_dir", help="runs/<run-id>")
    res.add_argument("--threads", type=int, default=1, help="torch threads per node (node-config num-threads)")
    res.add_argument("--run-config", action="append", default=[], help="overrides, e.g. 'strategy.num-rounds=10' to train on")
    res.add_argument("--timeout", type=float, default=3600.0)
    res.set_defaults(func=cmd_resume)
    exp = sub.add_parser("export", help="a run's model as a Hugging Face directory (from_pretrained / PeftModel.from_pretrained)")
    exp.add_argument("run_dir", help="runs/<run-id>")
    exp.add_argument("--round", type=int, default=None, help="a round with a checkpoint (default: the last)")
    exp.add_argument("--format", choices=("merged", "adapter"), default="merged")
    exp.add_argument("--out", required=True, help="the directory to write")
    exp.set_defaults(func=cmd_export)
    dev = sub.add_parser("device", help="print the device profile a SuperNode on this machine reports")
    dev.add_argument("--node-config", default="", help="the same string you pass to stamen-supernode --node-config")
    dev.set_defaults(func=cmd_device)
    stu = sub.add_parser("study", help="final accuracy per strategy and rank setting, and accuracy per round (PNG)")
    stu.add_argument("dirs", nargs="+", help="directories holding run directories")
    stu.add_argument("--target", type=float, default=0.8, help="fleet study (simulated clock): the accuracy to reach")
    stu.set_defaults(func=cmd_study)
    rep = sub.add_parser("report", help="summary and PNGs of a run's phase timings; several runs are compared")
    rep.add_argument("run_dirs", nargs="+", help="runs/<run-id> directories")
    rep.add_argument("--labels", default="", help="a name per run dir, comma-separated (default: its network labels)")
    rep.add_argument("--out", default=None, help="where the comparison goes (default: <first run's parent>/comparison)")
    rep.set_defaults(func=cmd_report)
    args = parser.parse_args(argv)
    if args.command in ("local", "simulate") and args.nodes is not None and args.nodes < 1 or args.command == "testbed" and args.nodes < 0:
        parser.error("--nodes must be at least 1")
    try:
        return args.func(args)
    except RunConfigError as err:
        print(f"[stamen] error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
