"""LoRA on the adapted Linear layers, through peft's low-level API.

Each round a client injects an adapter of its own rank: a *fresh* one (A random, B zero,
so the model starts as the global model; FLoRA) or one the server sent (FedIT, HetLoRA,
FlexLoRA: :func:`load_lora_factors`), trains it, and sends A and B back. peft names the
factors ``<module>.lora_A.weight`` (r x in) and ``<module>.lora_B.weight`` (out x r).
"""

from __future__ import annotations

import numpy as np
import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from torch import nn

from stamen.lora_math import tail_size

from .tensors import source_tensor


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


def load_lora_factors(model: nn.Module, factors: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Start the injected adapter from given factors, via peft's adapter state-dict helper."""
    from peft import set_peft_model_state_dict

    state = {}
    for name, (a, b) in factors.items():
        state[f"{name}.lora_A.weight"] = source_tensor(np.ascontiguousarray(a))
        state[f"{name}.lora_B.weight"] = source_tensor(np.ascontiguousarray(b))
    current = get_peft_model_state_dict(model)
    for key, value in state.items():
        if key not in current:
            raise ValueError(f"the server sent {key}, which this model's adapter does not have")
        if tuple(current[key].shape) != tuple(value.shape):
            raise ValueError(f"{key}: the server sent shape {tuple(value.shape)}, the adapter has {tuple(current[key].shape)}")
    result = set_peft_model_state_dict(model, state)
    missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if missing:
        raise ValueError(f"peft did not load {missing[:3]}")


def tail_norm(model: nn.Module, targets: list[str], fraction: float) -> torch.Tensor:
    """sqrt of the summed squares of the last ceil(fraction * r) rank components of every
    adapted module's A (rows) and B (columns): HetLoRA's regulariser (strategies/hetlora.py)."""
    total = None
    for name in targets:
        module = model.get_submodule(name)
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        r = a.shape[0]
        tail = tail_size(r, fraction)
        if tail == 0:
            continue
        term = a[-tail:].pow(2).sum() + b[:, -tail:].pow(2).sum()
        total = term if total is None else total + term
    return torch.sqrt(total) if total is not None else torch.zeros(())
