"""``stamen-supernode``: flwr's ``flower-supernode`` with transfer timing and telemetry.

It takes every flag ``flower-supernode`` takes, plus the runtime and measurement options
below, and then runs flwr's own SuperNode in this process with these additions:

* the warm runtime (``device_runtime/``): a warm executor in place of
  ``flower-superexec`` serves each message in a worker forked with the libraries, the
  base model and the data partition already loaded, and the SuperNode's polls are short
  (``--no-warm``: Flower's executor and polls, as plain ``flower-supernode``);

* a gRPC client interceptor on the Fleet channel that times the pull RPCs of each
  instruction (downlink) and the push RPCs of each reply (uplink)
  (``measurements/transport.py``);
* a spool (SQLite file) that this process and the ClientApp processes it starts write
  their events to, and a thread that streams the spool to the run's telemetry collector
  (``measurements/telemetry.py``). Events the collector does not take travel in replies.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys
from pathlib import Path

from device_runtime import supernode as runtime
from measurements.spool import ENV_VAR, Spool
from measurements.telemetry import DEFAULT_PORT, TelemetrySender
from measurements.transport import TransferTracker, install

log = logging.getLogger("stamen.supernode")


def measurement_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    warm = parser.add_argument_group("Stamen runtime options (docs/runtime.md)")
    warm.add_argument(
        "--no-warm",
        action="store_true",
        help="Flower's executor and polls: a fresh flwr-clientapp process per message (as plain flower-supernode)",
    )
    polls = runtime.WARM_POLLS
    flower = runtime.FLOWER_POLLS
    warm.add_argument("--idle-poll", type=runtime.poll_seconds, default=None,
                      help=f"seconds between pulls from the SuperLink while idle (default {polls.idle}; Flower's {flower.idle} with --no-warm)")
    warm.add_argument("--reply-poll", type=runtime.poll_seconds, default=None,
                      help=f"seconds between looks for the ClientApp's reply (default {polls.reply}; Flower's {flower.reply} with --no-warm)")
    warm.add_argument(
        "--transfer-concurrency",
        type=runtime.transfer_concurrency,
        default=None,
        help=f"object RPCs in flight per downlink and uplink (default {runtime.WARM_TRANSFER_CONCURRENCY}; "
        "Flower's 2, at most the CPU count, with --no-warm; docs/transfers.md)",
    )
    warm.add_argument("--task-poll", type=runtime.poll_seconds, default=None,
                      help=f"seconds between the executor's polls for tasks (default {polls.task}; Flower's {flower.task} with --no-warm)")
    group = parser.add_argument_group("Stamen measurement options")
    group.add_argument(
        "--measure-dir",
        default=None,
        help="where the node keeps its measurement spool (default: $FLWR_HOME/stamen or ~/.flwr/stamen)",
    )
    group.add_argument(
        "--telemetry-address",
        default=None,
        help=f"HOST:PORT of the run's telemetry collector (default: the SuperLink's host, port {DEFAULT_PORT})",
    )
    group.add_argument(
        "--telemetry-interval", type=float, default=1.0, help="seconds between two streams of events (default 1)"
    )
    group.add_argument(
        "--no-telemetry",
        action="store_true",
        help="do not stream; every event travels in a reply instead",
    )
    group.add_argument(
        "--no-transfer-timing", action="store_true", help="do not time the Fleet RPCs (as plain flower-supernode)"
    )
    return parser


def runtime_settings(opts: argparse.Namespace) -> tuple[runtime.NodePolls, int | None]:
    """The polls and transfer concurrency a node runs with: the flags, else the warm
    runtime's defaults, else (``--no-warm``) Flower's (concurrency None: Flower's own)."""
    base = runtime.FLOWER_POLLS if opts.no_warm else runtime.WARM_POLLS
    polls = runtime.NodePolls(
        idle=opts.idle_poll or base.idle, reply=opts.reply_poll or base.reply, task=opts.task_poll or base.task
    )
    return polls, opts.transfer_concurrency or (None if opts.no_warm else runtime.WARM_TRANSFER_CONCURRENCY)


def default_telemetry_address(argv: list[str]) -> str:
    superlink = "127.0.0.1:9092"
    for i, arg in enumerate(argv):
        if arg == "--superlink" and i + 1 < len(argv):
            superlink = argv[i + 1]
        elif arg.startswith("--superlink="):
            superlink = arg.split("=", 1)[1]
    host = superlink.rsplit(":", 1)[0] if ":" in superlink else superlink
    return f"{host}:{DEFAULT_PORT}"


def root_certificates(argv: list[str]) -> bytes | None:
    """The CA certificates of flower-supernode's ``--root-certificates`` (the node trusts
    the SuperLink, and so the telemetry collector that serves the SuperLink's
    certificate, with them); None under ``--insecure``: plaintext."""
    for i, arg in enumerate(argv):
        path = argv[i + 1] if arg == "--root-certificates" and i + 1 < len(argv) else (arg.split("=", 1)[1] if arg.startswith("--root-certificates=") else None)
        if path:
            return Path(path).expanduser().read_bytes()
    return None


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        measurement_parser().print_help()
        print("\nAll other flags are flower-supernode's:\n")
    opts, flower_argv = measurement_parser().parse_known_args(argv)
    if opts.telemetry_interval <= 0:
        sys.exit(f"stamen-supernode: --telemetry-interval must be > 0, got {opts.telemetry_interval}")
    if not opts.no_warm and "--allow-runtime-dependency-installation" in flower_argv:
        sys.exit("stamen-supernode: the warm runtime serves apps from this environment; runtime dependency installation needs --no-warm")
    polls, concurrency = runtime_settings(opts)
    runtime.install(warm=not opts.no_warm, polls=polls, concurrency=concurrency)
    print(
        f"stamen-supernode: {'cold' if opts.no_warm else 'warm'} runtime; polls: idle {polls.idle:g} s, "
        f"reply {polls.reply:g} s, task {polls.task:g} s; transfer concurrency {concurrency or 'Flower default'}",
        file=sys.stderr,
        flush=True,
    )

    measure_dir = Path(opts.measure_dir or Path(os.environ.get("FLWR_HOME", "~/.flwr")) / "stamen").expanduser()
    spool = Spool(measure_dir / "spool.sqlite")
    os.environ[ENV_VAR] = str(spool.path)  # the ClientApp processes inherit it
    spool.prune()

    tracker = TransferTracker(spool.add)
    if not opts.no_transfer_timing:
        install(tracker)
    sender = None
    if not opts.no_telemetry:
        address = opts.telemetry_address or default_telemetry_address(flower_argv)
        sender = TelemetrySender(
            spool, address, node_id=lambda: tracker.node_id, interval=opts.telemetry_interval, root_certificates=root_certificates(flower_argv)
        ).start()

    def finish() -> None:
        tracker.flush()
        if sender is not None:
            sender.stop()

    atexit.register(finish)
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["stamen-supernode", *flower_argv]
    flower_supernode()


if __name__ == "__main__":
    main()
