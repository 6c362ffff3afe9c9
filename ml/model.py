"""Base models: loading from any Hugging Face checkpoint, the classification wrapper, and
which Linear layers LoRA adapts."""

from __future__ import annotations

import fcntl
import logging
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stamen.config import ConfigError

from .model_path import ModelSource, default_cache_dir
from .tensors import source_tensor

log = logging.getLogger(__name__)

# LoRA targets by architecture family. FLoRA adapts all four attention projections of
# Llama-like models; for BERT-like encoders the usual choice (and peft's) is query/value.
_DEFAULT_TARGETS = {
    "bert": ("query", "value"),
    "roberta": ("query", "value"),
    "xlm-roberta": ("query", "value"),
    "electra": ("query", "value"),
    "distilbert": ("q_lin", "v_lin"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen3": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "gemma": ("q_proj", "k_proj", "v_proj", "o_proj"),
}


def materialize(source: ModelSource, cache_dir: str = "") -> str:
    """Return what ``from_pretrained`` should load: a directory or a hub id.

    A GGUF file is dequantized to fp32 once (about 20 s for SmolLM2-135M) and saved as a
    regular checkpoint under the cache directory; a file lock keeps several processes on
    one machine from doing it at the same time.
    """
    if source.kind != "gguf":
        return source.location
    gguf = Path(source.location)
    target = default_cache_dir(cache_dir) / "models" / f"{gguf.stem}-{gguf.stat().st_size}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").is_file():
            from transformers import AutoModelForCausalLM, AutoTokenizer

            log.info("dequantizing %s into %s (once)", gguf, target)
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
            )
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            # The tensors are already fp32; transformers only keeps a GGUF "quantizer"
            # marker, which makes save_pretrained refuse. Drop the marker, keep the weights.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            tmp = target.with_name(target.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            tmp.rename(target)
    return str(target)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class EncoderClassifier(nn.Module):
    """A Hugging Face encoder, mean-pooled over the attention mask, and a linear head.

    Mean pooling is how sentence-transformers trained all-MiniLM-L6-v2; it also avoids
    BERT's pooler, whose weights that checkpoint does not ship.
    """

    def __init__(self, backbone: nn.Module, num_labels: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.hidden_size, num_labels)

    def forward(self, input_ids, attention_mask, labels=None):
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        logits = self.head(pooled)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return loss, logits


def load_model(task: str, path: str, *, num_labels: int = 0) -> nn.Module:
    """Load the base model for a task from a directory or hub id (fp32, eval mode)."""
    from transformers import AutoModel, AutoModelForCausalLM

    try:
        if task == "text-classification":
            model: nn.Module = EncoderClassifier(AutoModel.from_pretrained(path), num_labels)
        elif task == "causal-lm":
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        else:
            raise ConfigError(f"model.task = {task!r} is not known")
    except OSError as err:
        raise ConfigError(f"model.path: cannot load {path!r} ({err})") from err
    return model.eval()


def model_type(model: nn.Module) -> str:
    inner = model.backbone if isinstance(model, EncoderClassifier) else model
    return getattr(inner.config, "model_type", "")


def target_module_names(model: nn.Module, leaf_names: tuple[str, ...] = ()) -> list[str]:
    """Qualified names of the Linear layers LoRA adapts, in a fixed (module) order.

    ``leaf_names`` (``lora.target-modules``) match the last name component, e.g. "query";
    empty means the architecture default (table above, then peft's own mapping).
    """
    if not leaf_names:
        kind = model_type(model)
        leaf_names = _DEFAULT_TARGETS.get(kind, ())
        if not leaf_names:
            from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_map

            leaf_names = tuple(peft_map.get(kind, ()))
        if not leaf_names:
            raise ConfigError(
                f"lora.target-modules = 'auto' has no default for model type {kind!r}; "
                "name the Linear layers to adapt, e.g. 'q_proj v_proj'"
            )
    names, linear_leaves = [], set()
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear):
            linear_leaves.add(leaf)
        if leaf in leaf_names:
            if not isinstance(module, nn.Linear):
                raise ConfigError(
                    f"lora.target-modules: {name} is a {type(module).__name__}, only nn.Linear is supported"
                )
            if not name.startswith("head"):
                names.append(name)
    if not names:
        raise ConfigError(
            f"lora.target-modules = {' '.join(leaf_names)!r} matches no Linear layer; "
            f"this model has: {', '.join(sorted(linear_leaves))}"
        )
    return names


def adapted_weights(model: nn.Module, targets: list[str]) -> dict[str, np.ndarray]:
    """The current weight of every adapted Linear, keyed by module name."""
    return {name: model.get_submodule(name).weight.detach().cpu().numpy().copy() for name in targets}


@torch.no_grad()
def load_adapted_weights(model: nn.Module, weights: dict[str, np.ndarray]) -> None:
    """Overwrite the adapted Linear weights (the merged global model) in place."""
    for name, value in weights.items():
        param = model.get_submodule(name).weight
        if tuple(param.shape) != value.shape:
            raise ValueError(f"{name}: global weight has shape {value.shape}, model has {tuple(param.shape)}")
        param.copy_(source_tensor(value))


def head_state(model: nn.Module) -> dict[str, np.ndarray]:
    """Fully trained, FedAvg-shared parameters (the classification head), keyed 'head.*'."""
    if not isinstance(model, EncoderClassifier):
        return {}
    return {f"head.{k}": v.detach().cpu().numpy().copy() for k, v in model.head.state_dict().items()}


@torch.no_grad()
def load_head_state(model: nn.Module, state: dict[str, np.ndarray]) -> None:
    if not isinstance(model, EncoderClassifier):
        return
    model.head.load_state_dict({k.removeprefix("head."): source_tensor(v) for k, v in state.items()})
