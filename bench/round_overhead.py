"""What a round costs beyond its training and its transfers, side by side in one run:

1. flower: stock ``flower-supernode`` x 2 with a trivial ClientApp that answers at once
   (bench/trivial_app: Flower's floor, its own polls);
2. cold: ``stamen local --no-warm`` (a fresh flwr-clientapp process per message,
   Flower's polls: SuperNode idle 3 s, reply 0.5 s, SuperExec 1 s, ServerApp 3 s);
3. warm: ``stamen local`` (the warm runtime and its default polls);
4. fast (only if named in ``--order``): warm with ``--idle-poll 0.2``, the SuperNode's
   idle poll at 0.2 s instead of 0.5 s (what that costs the SuperLink: docs/runtime.md).

Arms 2 and 3 run the default model and task (all-MiniLM-L6-v2, BBC News, FLoRA) on two
nodes for ``--rounds`` rounds of ``--steps`` local steps. For each client-round,
overhead = e2e - loop - downlink - uplink - serialize (start-up, which includes the
handler's load phase, plus polling: ``measurements.report.round_parts``). Printed per
arm, as medians over client-rounds from round 2 on: overhead, the round time, the loop,
and the ratios the warm runtime is judged by (docs/runtime.md):

* warm overhead <= 1.0 s per client-round;
* warm overhead <= 0.25 x the flower arm's round time.

    python bench/round_overhead.py [--rounds 6] [--steps 5] [--order flower,cold,warm[,fast]]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TRIVIAL_APP = ROOT / "bench" / "trivial_app"


def flower_arm(rounds: int, workdir: Path) -> dict:
    from deploy.local import LocalDeployment, NodeSpec

    result = workdir / "trivial.json"
    nodes = [NodeSpec(i, 2, supernode="flower") for i in range(2)]
    with LocalDeployment(nodes, workdir=workdir / "_deploy", app_dir=TRIVIAL_APP, supernode="flower") as dep:
        dep.run([f'num-rounds={rounds} result-path="{result}"'], echo=lambda line: None, timeout=1800)
    times = [r["round_s"] for r in json.loads(result.read_text()) if r["round"] >= 2]
    return {"round_s": statistics.median(times), "overhead_s": statistics.median(times), "loop_s": 0.0, "accuracy": None}


class MemorySampler:
    """Peak RSS and USS (pages no other process shares) of the node's processes, by role,
    sampled every 0.5 s while an arm runs: the SuperNode, its executor (the warm one or
    flower-superexec) and the per-message ClientApp processes (forked workers or
    flwr-clientapp). USS shows what a forked worker really adds."""

    def __init__(self) -> None:
        import threading

        self.peaks: dict[str, dict[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(0.5):
            for proc in psutil.process_iter(["cmdline"]):
                try:
                    cmd = " ".join(proc.info["cmdline"] or [])
                    parent = " ".join(proc.parent().cmdline()) if proc.parent() else ""
                    if "stamen-supernode" in cmd:
                        role = "supernode"
                    elif "device_runtime.executor" in cmd:
                        role = "worker" if "device_runtime.executor" in parent else "executor"
                    elif "flower-superexec" in cmd and "stamen-supernode" in parent:
                        role = "executor"
                    elif "flwr-clientapp" in cmd:
                        role = "worker"
                    else:
                        continue
                    mem = proc.memory_full_info()
                except (psutil.Error, AttributeError):
                    continue
                peak = self.peaks.setdefault(role, {"rss_mb": 0.0, "uss_mb": 0.0})
                peak["rss_mb"] = max(peak["rss_mb"], mem.rss / 1e6)
                peak["uss_mb"] = max(peak["uss_mb"], mem.uss / 1e6)


def stamen_arm(flags: list[str], rounds: int, steps: int, workdir: Path) -> dict:
    from measurements.report import round_parts

    overrides = f"strategy.num-rounds={rounds} train.local-steps={steps} eval.max-examples=128"
    cmd = [str(Path(sys.executable).parent / "stamen"), "local", "--nodes", "2", "--ranks", "4,8",
           "--device-classes", "raspberry-pi,jetson", "--output", str(workdir), "--run-config", overrides, *flags]
    with open(workdir / "stamen-local.log", "w") as log, MemorySampler() as memory:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({code}); see {workdir / 'stamen-local.log'}")
    (run_dir,) = [p for p in workdir.iterdir() if p.is_dir() and p.name.isdigit()]
    clients = [r for r in csv.DictReader(open(run_dir / "clients.csv")) if r["status"] == "ok" and int(r["round"]) >= 2]
    parts = [round_parts(r) for r in clients]
    rounds_csv = [r for r in csv.DictReader(open(run_dir / "rounds.csv")) if int(r["round"]) >= 2]
    metrics = list(csv.DictReader(open(run_dir / "metrics.csv")))
    return {
        "overhead_s": statistics.median(p["overhead_s"] for p in parts),
        "round_s": statistics.median(float(r["round_s"]) for r in rounds_csv),
        "loop_s": statistics.median(p["loop_s"] for p in parts),
        "startup_s": statistics.median(p["startup_s"] for p in parts),
        "poll_s": statistics.median(p["poll_s"] for p in parts),
        "starts": sorted({r["start"] for r in clients}),
        "accuracy": float(metrics[-1]["eval_accuracy"]),
        "node_rss_mb": statistics.median(float(r["node_rss_bytes"]) for r in clients if r.get("node_rss_bytes")) / 1e6,
        "memory_peaks_mb": memory.peaks,
        "run_dir": str(run_dir),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--order", default="flower,cold,warm")
    parser.add_argument("--keep", default="", help="keep the runs under this directory (default: a temporary one)")
    args = parser.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="round-overhead-"))
    results = {}
    for arm in args.order.split(","):
        workdir = base / arm
        workdir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        print(f"[bench] {arm}: running ({args.rounds} rounds, 2 nodes) ...", flush=True)
        if arm == "flower":
            results[arm] = flower_arm(args.rounds, workdir)
        else:
            flags = {"cold": ["--no-warm"], "warm": [], "fast": ["--idle-poll", "0.2"]}[arm]
            results[arm] = stamen_arm(flags, args.rounds, args.steps, workdir)
        results[arm]["wall_s"] = time.monotonic() - started
        print(f"[bench] {arm}: {json.dumps(results[arm])}", flush=True)
    print(f"\nmedians over client-rounds from round 2 on ({args.rounds} rounds, {args.steps} local steps, 2 nodes, loopback)")
    print(f"{'arm':<8}{'overhead s':>12}{'start-up s':>12}{'polling s':>11}{'loop s':>9}{'round s':>9}{'accuracy':>10}  starts")
    for arm, r in results.items():
        acc = "" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        print(f"{arm:<8}{r['overhead_s']:>12.3f}{r.get('startup_s', float('nan')):>12.3f}{r.get('poll_s', float('nan')):>11.3f}"
              f"{r['loop_s']:>9.3f}{r['round_s']:>9.2f}{acc:>10}  {','.join(r.get('starts', [])) or '-'}")
    if {"warm", "cold"} <= results.keys():
        print(f"warm/cold overhead: {results['warm']['overhead_s'] / results['cold']['overhead_s']:.3f}x; "
              f"round time: {results['warm']['round_s'] / results['cold']['round_s']:.3f}x")
    if {"warm", "flower"} <= results.keys():
        ratio = results["warm"]["overhead_s"] / results["flower"]["round_s"]
        print(f"warm overhead / flower's trivial round: {ratio:.3f}x (target <= 0.25)")
    if "warm" in results:
        print(f"warm overhead {results['warm']['overhead_s']:.3f} s per client-round (target <= 1.0 s)")
    for arm, r in results.items():
        if "memory_peaks_mb" in r:
            peaks = ", ".join(f"{role} RSS {m['rss_mb']:.0f} / USS {m['uss_mb']:.0f} MB" for role, m in sorted(r["memory_peaks_mb"].items()))
            print(f"{arm} memory peaks: {peaks}; node between rounds (node_rss_bytes, median) {r['node_rss_mb']:.0f} MB")
    (base / "results.json").write_text(json.dumps(results, indent=2))
    print(f"results: {base / 'results.json'}")


if __name__ == "__main__":
    main()
