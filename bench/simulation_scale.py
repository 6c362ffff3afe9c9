"""How Stamen's simulation grows with the fleet: ``stamen simulate`` (Flower's simulation
engine, Ray) at N = 10, 100, 1,000 virtual nodes, each run side by side in one call.

Each N runs the same tiny FLoRA config (MiniLM, 1 local step of batch 8 at sequence
length 32, evaluation on 32 examples, IID partitions, which are what 1,000 nodes of BBC
News allow: docs/scale.md), every node in every round unless ``--fraction`` samples. It
prints, per N: the wall time of the whole command, the median round time (rounds.csv:
configure to aggregate), the time to build the round's messages (configure_s), the round
time per client-round, and the peak memory the machine used above what it used before
the run (psutil's ``used``, sampled every 0.2 s: the SuperLink, Ray's workers and the
ServerApp together). Then the growth exponents: the slope of log(figure) over log(N)
between the smallest and the largest N (1: linear).

    python bench/simulation_scale.py [--nodes 10,100,1000] [--rounds 1] [--fraction 1.0]
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
TINY = (
    "train.local-steps=1 train.batch-size=8 model.max-seq-len=32 eval.max-examples=32 "
    'data.partitioner="iid" checkpoint.keep=1'
)


class PeakMemory:
    """Peak of the machine's used memory above its level at the start (bytes)."""

    def __init__(self, every: float = 0.2) -> None:
        self.every, self.base, self.peak = every, psutil.virtual_memory().used, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, psutil.virtual_memory().used - self.base)
            self._stop.wait(self.every)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_one(n: int, rounds: int, fraction: float, out: Path, timeout: float) -> dict:
    config = f"{TINY} strategy.num-rounds={rounds} strategy.fraction-train={fraction}"
    cmd = [sys.executable, "-m", "cli.main", "simulate", "--nodes", str(n), "--output", str(out), "--run-config", config,
           "--timeout", str(timeout)]
    log = out / f"simulate-{n}.log"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with PeakMemory() as mem, open(log, "w") as f:
        code = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout + 120).returncode
    wall = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"stamen simulate --nodes {n} failed (exit {code}); see {log}")
    (run_dir,) = [p for p in out.iterdir() if p.is_dir() and p.name.isdigit()]
    rounds_rows = list(csv.DictReader(open(run_dir / "rounds.csv")))
    round_s = statistics.median(float(r["round_s"]) for r in rounds_rows)
    clients = statistics.median(int(r["participants"]) for r in rounds_rows)
    return {
        "n": n, "wall_s": wall, "round_s": round_s, "configure_s": statistics.median(float(r["configure_s"]) for r in rounds_rows),
        "clients": clients, "per_client_s": round_s / clients, "peak_gb": mem.peak / 1e9,
    }


def exponent(rows: list[dict], key: str) -> float:
    a, b = rows[0], rows[-1]
    return math.log(b[key] / a[key]) / math.log(b["n"] / a["n"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="10,100,1000")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--fraction", type=float, default=1.0)
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--keep", default="", help="keep the run directories here (default: a temporary directory)")
    args = parser.parse_args()
    sizes = [int(x) for x in args.nodes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="stamen-scale-") as tmp:
        base = Path(args.keep or tmp)
        for n in sizes:
            print(f"[scale] N = {n} ...", flush=True)
            rows.append(run_one(n, args.rounds, args.fraction, base / f"n{n}", args.timeout))
            r = rows[-1]
            print(f"[scale] N = {n}: wall {r['wall_s']:.0f} s, round {r['round_s']:.1f} s, peak {r['peak_gb']:.2f} GB", flush=True)
    print(f"\n{'N':>6} {'clients/round':>13} {'wall s':>8} {'round s':>8} {'configure s':>11} {'s/client-round':>14} {'peak GB':>8} {'MB/node':>8}")
    for r in rows:
        print(f"{r['n']:>6} {r['clients']:>13.0f} {r['wall_s']:>8.1f} {r['round_s']:>8.2f} {r['configure_s']:>11.3f} "
              f"{r['per_client_s']:>14.3f} {r['peak_gb']:>8.2f} {r['peak_gb'] * 1e3 / r['n']:>8.1f}")
    if len(rows) > 1:
        print(f"\ngrowth exponent, N = {rows[0]['n']} -> {rows[-1]['n']} (1 = linear): round time "
              f"{exponent(rows, 'round_s'):.2f}, configure {exponent(rows, 'configure_s'):.2f}, peak memory {exponent(rows, 'peak_gb'):.2f}")


if __name__ == "__main__":
    main()
