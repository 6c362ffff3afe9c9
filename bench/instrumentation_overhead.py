"""What does the instrumentation cost? Two measurements, each side by side in one run.

1. component (default): the ClientApp mod (phase timing, resource sampler at
   measure.sample-interval, events into a spool) around the real local training of
   all-MiniLM-L6-v2 + LoRA r=8, against the same training without it. Interleaved
   A/B repetitions; prints the ratio of medians.
2. e2e (--e2e): the real app on loopback, alternating a deployment with everything on
   (stamen-supernode, telemetry, mod) and one with everything off (plain
   flower-supernode, measure.enabled=false). Prints the ratio of mean round times with
   a 95% interval. Flower's 3 s polling makes single rounds jitter by seconds, so this
   needs many rounds to resolve 1%; the interval says what was resolved.

    python bench/instrumentation_overhead.py [--reps 8] [--steps 4] [--e2e --rounds 3 --pairs 2]
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def component(reps: int, steps: int, interval: float) -> None:
    import tomllib

    import torch
    from flwr.app import Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from measurements import client_mod
    from measurements.phases import phase
    from measurements.spool import ENV_VAR
    from ml.loop import train
    from ml.lora import attach_fresh_lora
    from ml.model import target_module_names
    from ml.tasks import build_task
    from stamen.config import StamenConfig

    torch.set_num_threads(1)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # Messages outside a running app
    defaults = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    run_config = {**defaults, "measure.sample-interval": interval}
    cfg = StamenConfig.from_run_config(run_config)
    task, split = build_task(cfg)
    data = split.partition(partition_id=0, num_partitions=4, alpha=0.5, seed=42)
    base = task.load_model()
    targets = target_module_names(base)
    model = attach_fresh_lora(base, targets, rank=8, alpha=16.0, seed=0)

    def handler(msg, context):
        with phase("loop"):
            train(model, task, data, steps=steps, batch_size=8, learning_rate=1e-3, head_learning_rate=5e-3, seed=0)
        return Message(RecordDict(), reply_to=msg)

    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=run_config)
    with tempfile.TemporaryDirectory() as spool_dir:
        os.environ[ENV_VAR] = str(Path(spool_dir) / "spool.sqlite")
        times = {"off": [], "on": []}
        handler(Message(RecordDict(), dst_node_id=1, message_type="train"), context)  # warm-up
        for i in range(reps):
            for arm in (("off", "on") if i % 2 == 0 else ("on", "off")):
                msg = Message(RecordDict(), dst_node_id=1, message_type="train")
                t0 = time.perf_counter()
                if arm == "on":
                    client_mod.measurement_mod(msg, context, handler)
                else:
                    handler(msg, context)
                times[arm].append(time.perf_counter() - t0)
                print(f"  rep {i + 1}/{reps} {arm:>3}: {times[arm][-1]:.3f} s", flush=True)
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    pairs = sorted(a / b for a, b in zip(times["on"], times["off"], strict=True))  # each rep's two runs were adjacent
    print(f"component: {steps} MiniLM LoRA steps per rep, {reps} reps per arm, sample interval {interval} s")
    print(f"  median without instrumentation {off:.3f} s, with {on:.3f} s: ratio of medians {on / off:.4f}")
    print(f"  per-rep ratios: median {statistics.median(pairs):.4f}, quartiles {pairs[len(pairs) // 4]:.4f} .. {pairs[(3 * len(pairs)) // 4]:.4f}")


def e2e(rounds: int, pairs: int) -> None:
    from deploy.local import LocalDeployment, heterogeneous_nodes

    overrides = f"strategy.num-rounds={rounds} train.local-steps=8 eval.max-examples=64 strategy.min-nodes=2"
    times = {"on": [], "off": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(pairs):
            for arm in (("on", "off") if i % 2 == 0 else ("off", "on")):
                kind = "stamen" if arm == "on" else "flower"
                nodes = heterogeneous_nodes(2, [4, 8], ["raspberry-pi", "jetson"], 1, [], [kind])
                out = Path(tmp) / f"{arm}-{i}"
                extra = f' output.dir="{out}" measure.enabled={"true" if arm == "on" else "false"}'
                with LocalDeployment(nodes, workdir=out / "_deploy") as dep:
                    run_id = dep.run([overrides + extra], echo=lambda line: None, timeout=1800)
                rows = list(csv.DictReader(open(out / str(run_id) / "rounds.csv")))
                times[arm] += [float(r["round_s"]) for r in rows]
                print(f"  pair {i + 1}/{pairs} {arm:>3}: rounds {', '.join(r['round_s'] for r in rows)} s", flush=True)
    m_on, m_off = statistics.mean(times["on"]), statistics.mean(times["off"])
    se = math.sqrt(statistics.variance(times["on"]) / len(times["on"]) + statistics.variance(times["off"]) / len(times["off"]))
    lo, hi = (m_on - m_off - 1.96 * se) / m_off, (m_on - m_off + 1.96 * se) / m_off
    print(f"e2e: {len(times['on'])} rounds per arm, 2 nodes on loopback")
    print(f"  mean round {m_off:.2f} s off, {m_on:.2f} s on: ratio {m_on / m_off:.4f} (95% interval of the difference {100 * lo:+.1f}% .. {100 * hi:+.1f}%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--e2e", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=2)
    args = parser.parse_args()
    component(args.reps, args.steps, args.interval)
    if args.e2e:
        e2e(args.rounds, args.pairs)


if __name__ == "__main__":
    main()
