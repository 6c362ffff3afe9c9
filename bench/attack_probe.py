"""The attack probe of docs/robustness.md: three SuperNodes on loopback (a real
flower-superlink, stamen-supernodes), one of them malicious through the test-only module
tests/attacks/sitecustomize.py, with the update bounds off (as before them) and on.

    .venv/bin/python bench/attack_probe.py [--rounds 2] [--output runs/attack-probe] [--rows honest,scale-off,...]

Rows: ``honest``; ``scale-off`` / ``scale-clip`` / ``scale-drop`` (the attacker multiplies
its LoRA B factors and its head by 1e4; robust off, the default clip, drop);
``claim-off`` / ``claim-on`` (it claims 10^9 examples in its replies and its profile).
Prints one table row per run: the held-out accuracy after the last round, the norm of the
adapted weights (12 query/value matrices of all-MiniLM-L6-v2), and what clients.csv says
about the attacker. Every row is a separate run of about 3 minutes on 2 cores."""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deploy.local import LocalDeployment, NodeSpec  # noqa: E402

ATTACKS = ROOT / "tests" / "attacks"
OFF = "robust.norm-multiple=0.0 robust.max-weight-share=1.0"
ROWS = {
    "honest": ("", ""),
    "scale-off": ("scale=1e4", OFF),
    "scale-clip": ("scale=1e4", ""),
    "scale-drop": ("scale=1e4", 'robust.over-bound="drop"'),
    "claim-off": ("num-examples=1e9,profile", OFF),
    "claim-on": ("num-examples=1e9,profile", ""),
}


def run_row(name: str, rounds: int, output: Path) -> dict:
    attack, robust = ROWS[name]
    nodes = [NodeSpec(i, 3, device_class="cpu", lora_rank=8, num_threads=1) for i in range(3)]
    if attack:
        nodes[2] = NodeSpec(2, 3, device_class="cpu", lora_rank=8, num_threads=1,
                            env={"PYTHONPATH": str(ATTACKS), "STAMEN_TEST_ATTACK": attack})
    out = output / name
    overrides = f'strategy.num-rounds={rounds} strategy.min-nodes=3 output.dir="{out}" {robust}'
    t0 = time.monotonic()
    with LocalDeployment(nodes, workdir=out / "_deploy") as dep:
        run_id = dep.run([overrides], echo=lambda line: None, timeout=3600)
    run = out / str(run_id)
    metrics = list(csv.DictReader(open(run / "metrics.csv")))
    clients = list(csv.DictReader(open(run / "clients.csv")))
    weights = dict(np.load(run / "global_model.npz"))
    norm = float(np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for k, v in weights.items() if not k.startswith("head."))))
    attacker = [r for r in clients if r["status"] != "ok"]
    return {
        "row": name,
        "accuracy": float(metrics[-1]["eval_accuracy"]),
        "weight_norm": norm,
        "attacker": "; ".join(sorted({f"{r['status']}: {r['reason'][:90]}" for r in attacker})) or "-",
        "wall_s": time.monotonic() - t0,
        "run": str(run),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--output", default=str(ROOT / "runs" / "attack-probe"))
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    args = parser.parse_args()
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    print(f"| row | accuracy after round {args.rounds} | adapted-weight norm | the attacker in clients.csv | wall |")
    print("| --- | --- | --- | --- | --- |")
    for name in rows:
        r = run_row(name, args.rounds, Path(args.output))
        print(f"| {r['row']} | {r['accuracy']:.3f} | {r['weight_norm']:.4g} | {r['attacker']} | {r['wall_s']:.0f} s |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
