"""What structured pruning buys a device: one LoRA training step and its peak memory by
pruning ratio, side by side in one run.

For each pruning ratio the model (all-MiniLM-L6-v2 + a classification head, LoRA rank 8
on query/value, batch 8 x 128 tokens; or SmolLM2-135M, LoRA on q/k/v/o, batch 4 x 128)
is pruned with ml/pruning.py: the same share of attention heads (Llama: key/value
groups) and MLP channels in every layer, lowest weight norm first (the importance a
group without LoRA gradients falls back to). Step times are interleaved over ratios
within each repetition; the median is reported with its ratio to the unpruned model.
Memory is the peak resident set of a fresh child process while it runs 3 training
steps of the pruned model (sampled every 2 ms; the unpruned checkpoint's load before
pruning is handed back to the OS with ``malloc_trim`` first, or it would be every
ratio's peak).

The "probe" row is FedSpine's reward probe (ml/pruning.py: probe_loss): one forward
pass of the unpruned model in eval mode without gradients, timed in the same
interleaving; a round runs two of them.

    python bench/pruning_speed.py [--reps 10] [--ratios 0,0.1,0.2,0.3,0.5] [--models minilm,smollm2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_lora, load_default, peak_rss_mb, random_inputs  # noqa: E402

from ml import pruning  # noqa: E402


def _build(name: str, ratio: float):
    """(model, batch) of a pruned, LoRA-adapted model; data are random (only time matters)."""
    model, targets, batch = load_default(name)
    if ratio > 0:
        importance = pruning.UnitImportance(model)
        importance.update()  # no LoRA yet: weight norms
        pruning.prune(model, pruning.keep_most_important(importance.scores, ratio))
    add_lora(model, targets)
    return model.train(), random_inputs(name, batch)


def _step(model, optimizer, inputs) -> None:
    out = model(**inputs)
    loss = out[0] if isinstance(out, tuple) else out.loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _peak_rss_in_steps(name: str, ratio: float, queue) -> None:
    model, inputs = _build(name, ratio)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def steps():
        for _ in range(3):
            _step(model, opt, inputs)

    queue.put(peak_rss_mb(steps))


def run(name: str, ratios: list[float], *, reps: int = 10, echo=print) -> list[dict]:
    models = {}
    for r in ratios:
        model, inputs = _build(name, r)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        _step(model, opt, inputs)  # warm-up
        models[r] = (model, opt, inputs)
    times = {r: [] for r in ratios}
    probe_times = []
    for _ in range(reps):
        for r, (model, opt, inputs) in models.items():
            t0 = time.perf_counter()
            _step(model, opt, inputs)
            times[r].append(time.perf_counter() - t0)
        probe_times.append(_probe(*models[ratios[0]][::2]))
    ctx = multiprocessing.get_context("spawn")
    rss = {}
    for r in ratios:
        queue = ctx.Queue()
        child = ctx.Process(target=_peak_rss_in_steps, args=(name, r, queue))
        child.start()
        rss[r] = queue.get(timeout=600)
        child.join()
    base = statistics.median(times[ratios[0]])
    echo(f"{name}: {reps} steps per ratio, interleaved; baseline = ratio {ratios[0]:g}")
    echo(f"  {'ratio':>5} {'params MB':>9} {'median s':>9} {'x base':>7} {'peak RSS MB':>12}")
    rows = []
    for r in ratios:
        params = sum(p.numel() * p.element_size() for p in models[r][0].parameters()) / 1e6
        med = statistics.median(times[r])
        rows.append({"model": name, "ratio": r, "params_mb": params, "median_s": med, "speed_ratio": med / base, "peak_rss_mb": rss[r]})
        echo(f"  {r:5.2f} {params:9.1f} {med:9.4f} {med / base:7.2f} {rss[r]:12.0f}")
    probe = statistics.median(probe_times)
    rows.append({"model": name, "ratio": "probe", "median_s": probe, "speed_ratio": probe / base})
    echo(f"  {'probe':>5} {'':9} {probe:9.4f} {probe / base:7.2f}   (one eval forward of the unpruned model; a round runs two)")
    return rows


@torch.no_grad()
def _probe(model, inputs) -> float:
    model.eval()
    try:
        t0 = time.perf_counter()
        model(**inputs)
        return time.perf_counter() - t0
    finally:
        model.train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--ratios", default="0,0.1,0.2,0.3,0.5")
    parser.add_argument("--models", default="minilm")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in args.models.split(","):
        run(name, [float(r) for r in args.ratios.split(",")], reps=args.reps)


if __name__ == "__main__":
    main()
