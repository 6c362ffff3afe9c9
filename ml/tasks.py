"""Tasks: how batches are built, what the loss is, and how a model is evaluated.

Three tasks share everything else (LoRA, data, strategies):

* ``text-classification``: an encoder + mean pooling + linear head; reports accuracy.
* ``causal-lm``: a decoder trained on the articles' text, one article = one sequence;
  reports loss and perplexity.
* ``image-classification``: a ViT (built from a config, ``model.path = "vit:..."``, or a
  checkpoint directory); used by the early-exit strategies (ml/early_exit.py).

``load_backbone()`` gives the bare encoder that the early-exit model runs block by block.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .data import TextDataset
from .model import load_model, load_tokenizer


def pick_device(requested: str = "auto") -> torch.device:
    """"auto": the first CUDA device if there is one (Jetson, GPU server), else the CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} was asked for, but torch sees no CUDA device")
    return device


def to_device(batch: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}


class _TextTask:
    """Shared by the tasks: the tokenizer, truncation, and loading the model."""

    name = ""

    def __init__(self, model_path: str, *, max_seq_len: int, num_labels: int = 0) -> None:
        self.model_path = model_path
        self.max_seq_len = max_seq_len
        self.num_labels = num_labels
        self.tokenizer = load_tokenizer(model_path)

    def load_model(self) -> nn.Module:
        return load_model(self.name, self.model_path, num_labels=self.num_labels)

    def load_backbone(self) -> nn.Module:
        from transformers import AutoModel

        return AutoModel.from_pretrained(self.model_path).eval()

    def tokenize(self, data: TextDataset, index: np.ndarray):
        return self.tokenizer(
            [data.texts[i] for i in index],
            truncation=True,
            max_length=self.max_seq_len,
            padding=True,
            return_tensors="pt",
        )


class TextClassification(_TextTask):
    name = "text-classification"
    metric = "accuracy"

    def batch(self, data: TextDataset, index: np.ndarray) -> dict[str, torch.Tensor]:
        enc = self.tokenize(data, index)
        return {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "labels": torch.as_tensor(data.labels[index]),
        }

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss, _ = model(**batch)
        return loss

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: TextDataset, batch_size: int) -> dict[str, float]:
        model.eval()
        total_loss, correct = 0.0, 0
        for start in range(0, len(data), batch_size):
            batch = to_device(self.batch(data, np.arange(start, min(start + batch_size, len(data)))), model)
            loss, logits = model(**batch)
            total_loss += loss.item() * len(batch["labels"])
            correct += (logits.argmax(-1) == batch["labels"]).sum().item()
        return {"loss": total_loss / len(data), "accuracy": correct / len(data)}


class CausalLM(_TextTask):
    name = "causal-lm"
    metric = "perplexity"

    def batch(self, data: TextDataset, index: np.ndarray) -> dict[str, torch.Tensor]:
        enc = self.tokenize(data, index)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).loss

    def example_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The mean over sequences of each sequence's mean next-token loss: DP-SGD's form,
        where one sequence is the privacy unit (:meth:`loss` is the token mean over the
        batch, in which a long sequence weighs more and scales the others)."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        targets = batch["labels"][:, 1:]
        tokens = nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
        counted = (targets != -100).to(tokens.dtype)
        return ((tokens * counted).sum(1) / counted.sum(1).clamp(min=1.0)).mean()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: TextDataset, batch_size: int) -> dict[str, float]:
        model.eval()
        total_loss, total_tokens = 0.0, 0
        for start in range(0, len(data), batch_size):
            batch = to_device(self.batch(data, np.arange(start, min(start + batch_size, len(data)))), model)
            # HF shifts labels by one: the number of predicted tokens per row is (non-pad) - 1
            n_tokens = int((batch["labels"][:, 1:] != -100).sum())
            total_loss += model(**batch).loss.item() * n_tokens
            total_tokens += n_tokens
        loss = total_loss / max(total_tokens, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


class ImageClassification:
    """Images in, one label out. There is no single-head image model in this project: the
    early-exit model (ml/early_exit.py) puts its exits on :meth:`load_backbone`."""

    name = "image-classification"
    metric = "accuracy"

    def __init__(self, model_path: str, *, num_labels: int) -> None:
        self.model_path = model_path
        self.num_labels = num_labels

    def load_backbone(self) -> nn.Module:
        """A ViT from ``vit:<ViTConfig fields>`` (random weights from torch's current seed)
        or from a checkpoint directory / hub id."""
        from transformers import ViTConfig, ViTModel

        if self.model_path.startswith("vit:"):
            from .model_path import vit_config_fields

            return ViTModel(ViTConfig(**vit_config_fields(self.model_path)), add_pooling_layer=False).eval()
        return ViTModel.from_pretrained(self.model_path, add_pooling_layer=False).eval()

    def load_model(self) -> nn.Module:
        raise ValueError("model.task = 'image-classification' is served by the early-exit strategies only (reefl, depthfl, inclusivefl, exclusivefl)")

    def batch(self, data, index: np.ndarray) -> dict[str, torch.Tensor]:
        return {"pixel_values": torch.from_numpy(data.images[index]), "labels": torch.as_tensor(data.labels[index])}


def make_task(task: str, model_path: str, *, max_seq_len: int, num_labels: int):
    if task == "image-classification":
        return ImageClassification(model_path, num_labels=num_labels)
    if task == "text-classification":
        return TextClassification(model_path, max_seq_len=max_seq_len, num_labels=num_labels)
    return CausalLM(model_path, max_seq_len=max_seq_len)


def param_groups(model: nn.Module, learning_rate: float, head_learning_rate: float) -> list[dict]:
    """The optimizer groups of a LoRA model: the adapter at ``learning_rate``, the head
    (``head.*``, if it trains) at ``head_learning_rate``."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in trainable if not n.startswith("head.")], "lr": learning_rate}]
    head = [p for n, p in trainable if n.startswith("head.")]
    if head:
        groups.append({"params": head, "lr": head_learning_rate})
    return groups


def build_task(cfg):
    """The task and data split a :class:`stamen.config.StamenConfig` describes."""
    from .data import FederatedSplit
    from .model import materialize
    from .model_path import locate_model

    path = materialize(locate_model(cfg.model.path), cfg.model.cache_dir)
    split = FederatedSplit.make(cfg.data.name, test_fraction=cfg.data.test_fraction, seed=cfg.data.seed)
    task = make_task(cfg.model.task, path, max_seq_len=cfg.model.max_seq_len, num_labels=len(split.test.class_names))
    return task, split
