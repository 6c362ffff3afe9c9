"""What do short idle polls cost the SuperLink? Its CPU and the RPCs per second it serves
while N idle SuperNodes poll it every P seconds, for several N and P in one run.

Each poller is what an idle SuperNode does: it registers with a real ``flower-superlink``
on loopback through flwr's own Fleet connection (the SuperNode's ``_init_connection``)
and calls PullMessages every P seconds (``--idle-poll`` of stamen-supernode); no
messages are ever sent, so every pull is empty. Pollers are threads of this process
(100 SuperNode processes with the app's libraries would not fit beside the SuperLink
on a small machine); the SuperLink is measured from outside, as a process: CPU seconds
(user + system, its children included) over the window, divided by the window.

    python bench/poll_cost.py [--nodes 10,100] [--polls 3,1,0.5,0.2,0.1] [--window 15]

Prints one row per (N, P): the RPC rate asked for and achieved, the SuperLink's CPU in
% of one core, and its CPU per 1,000 RPCs. Results: docs/runtime.md ("Polls").
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _cpu_s(proc) -> float:
    import psutil

    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            continue
    return total


class Poller(threading.Thread):
    def __init__(self, address: str, poll_s: float, stop: threading.Event, ready: threading.Barrier) -> None:
        super().__init__(daemon=True)
        self.address, self.poll_s, self.stop, self.ready = address, poll_s, stop, ready
        self.pulls = 0
        self.counting = False

    def run(self) -> None:
        from flwr.supernode.start_client_internal import _init_connection

        with _init_connection("grpc-rere", self.address, True) as conn:
            receive = conn[1]
            self.ready.wait()
            while not self.stop.is_set():
                receive()
                if self.counting:
                    self.pulls += 1
                self.stop.wait(self.poll_s)


def measure(address: str, superlink, nodes: int, poll_s: float, window: float) -> dict:
    stop = threading.Event()
    ready = threading.Barrier(nodes + 1)
    pollers = [Poller(address, poll_s, stop, ready) for _ in range(nodes)]
    for p in pollers:
        p.start()
    ready.wait(timeout=120)
    time.sleep(min(5.0, 2 * poll_s + 1.0))  # settle: registration, first heartbeats
    for p in pollers:
        p.counting = True
    cpu0, t0 = _cpu_s(superlink), time.monotonic()
    time.sleep(window)
    cpu1, t1 = _cpu_s(superlink), time.monotonic()
    for p in pollers:
        p.counting = False
    stop.set()
    for p in pollers:
        p.join(timeout=30)
    rpcs = sum(p.pulls for p in pollers) / (t1 - t0)
    cpu_pct = 100.0 * (cpu1 - cpu0) / (t1 - t0)
    return {"nodes": nodes, "poll_s": poll_s, "asked_rps": nodes / poll_s, "rps": rpcs, "cpu_pct": cpu_pct}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", default="10,100")
    parser.add_argument("--polls", default="3,1,0.5,0.2,0.1")
    parser.add_argument("--window", type=float, default=15.0, help="seconds measured per row")
    args = parser.parse_args()
    import psutil

    from deploy.local import LocalDeployment, wait_for_port

    with tempfile.TemporaryDirectory() as tmp, LocalDeployment([], workdir=Path(tmp)) as dep:
        superlink = psutil.Process(dep.procs[0][1].pid)
        address = f"127.0.0.1:{dep.fleet_port}"
        wait_for_port(dep.fleet_port, 60, dep.procs[0][1], "flower-superlink", Path(tmp) / "superlink.log")
        time.sleep(10.0)  # the SuperLink's own start-up work settles
        cpu0, t0 = _cpu_s(superlink), time.monotonic()
        time.sleep(args.window)
        idle = 100.0 * (_cpu_s(superlink) - cpu0) / (time.monotonic() - t0)
        print(f"SuperLink with no nodes: {idle:.1f}% of a core ({os.cpu_count()} cores here)", flush=True)
        print(f"{'nodes':>6}{'poll s':>8}{'asked RPC/s':>13}{'RPC/s':>9}{'SuperLink CPU':>15}{'CPU ms / RPC':>14}", flush=True)
        for nodes in (int(n) for n in args.nodes.split(",")):
            for poll in (float(p) for p in args.polls.split(",")):
                r = measure(address, superlink, nodes, poll, args.window)
                per_rpc = 10.0 * (r["cpu_pct"] - idle) / r["rps"] if r["rps"] else float("nan")
                print(f"{nodes:>6}{poll:>8g}{r['asked_rps']:>13.1f}{r['rps']:>9.1f}{r['cpu_pct']:>14.1f}%{per_rpc:>14.2f}", flush=True)


if __name__ == "__main__":
    main()
