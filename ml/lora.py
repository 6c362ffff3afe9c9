"""LoRA on the adapted Linear layers, through peft's low-level API.

Each round a client injects a *fresh* adapter (A random, B zero, so the model starts as
the global model) of its own rank, trains it, and sends A and B back. peft names the
factors ``<module>.lora_A.weight`` (r x in) and ``<module>.lora_B.weight`` (out x r).
"""

from __future__ import annotations

import numpy as np
import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from torch import nn


def attach_fresh_lora(model: nn.Module, targets: list[str], *, rank: int, alpha: float, seed: int) -> nn.Module:
    """Inject a new LoRA adapter and make only it (and the head, if any) trainable."""
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets))
    model = inject_adapter_in_model(config, model)
    for name, param in model.named_parameters():
        param.requires_grad = "lora_" in name or name.startswith("head.")
    return model


def lora_factors(model: nn.Module, targets: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{module: (A, B)} of the injected adapter, via peft's adapter state-dict helper."""
    state = get_peft_model_state_dict(model)
    out = {}
    for name in targets:
        a = state[f"{name}.lora_A.weight"].detach().cpu().numpy()
        b = state[f"{name}.lora_B.weight"].detach().cpu().numpy()
        out[name] = (a, b)
    return out
