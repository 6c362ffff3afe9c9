"""A run's model as standard Hugging Face directories (docs/checkpoints.md).

* :func:`export_merged`: ``model/``, the base model with the global adapted weights and
  head loaded, saved with ``save_pretrained`` beside its tokenizer. A causal LM opens with
  ``AutoModelForCausalLM.from_pretrained(dir)``; a text classifier with
  ``AutoModelForSequenceClassification.from_pretrained(dir, trust_remote_code=True)``
  (its class, ml/hf_classifier.py, travels in the directory) and has ``id2label``.
* :func:`export_adapter`: ``adapter/``, a peft LoRA adapter (and, for a classifier, the
  head as a module to save) that ``PeftModel.from_pretrained(base, dir)`` applies to the
  frozen base weights; ``base/`` beside it for a classifier (the base encoder in the
  class above; a causal LM's adapter names its base model's path instead).
* :func:`export_early_exit` / :func:`load_early_exit`: the early-exit model, whose exits
  and shared module no transformers class holds: its weights and ``early-exit.json``.

Arrays come in the global form the strategies keep (``<module>.weight``, ``head.*``), and
an adapter as ``<module>.lora_A`` / ``.lora_B`` with its scaling folded into B.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from stamen import keys
from stamen.records import split_global

from .model import EncoderClassifier, load_adapted_weights, load_head_state

EARLY_EXIT_FILE = "early-exit.json"


def _fresh(out: Path) -> Path:
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, out: Path) -> Path:
    """Replace ``out`` with the finished ``tmp`` (an export is never seen half written)."""
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _save_tokenizer(task, out: Path) -> None:
    tokenizer = task.tokenizer
    tokenizer.model_max_length = task.max_seq_len  # truncation=True then cuts where Stamen did
    tokenizer.save_pretrained(out)


def hf_classifier(model: EncoderClassifier, label_names: Sequence[str]):
    """The classifier as ml/hf_classifier.py's MeanPoolingClassifier, same weights."""
    from .hf_classifier import MeanPoolingClassifier

    config = model.backbone.config
    config.num_labels = len(label_names)
    config.id2label = dict(enumerate(label_names))
    config.label2id = {name: i for i, name in enumerate(label_names)}
    MeanPoolingClassifier.register_for_auto_class("AutoModelForSequenceClassification")
    hf = MeanPoolingClassifier(config)
    hf.load_state_dict(model.state_dict())
    return hf.eval()


def merged_model(task, global_arrays: Mapping[str, np.ndarray], label_names: Sequence[str]):
    """The base model with the global weights and head loaded, as a transformers model."""
    weights, head = split_global(dict(global_arrays))
    model = task.load_model()
    load_adapted_weights(model, weights)
    load_head_state(model, head)
    return hf_classifier(model, label_names) if isinstance(model, EncoderClassifier) else model


def export_merged(task, global_arrays: Mapping[str, np.ndarray], out: Path, *, label_names: Sequence[str] = ()) -> Path:
    """``out``: a ``from_pretrained`` directory of the merged model and its tokenizer."""
    tmp = _fresh(out)
    merged_model(task, global_arrays, label_names).save_pretrained(tmp)
    _save_tokenizer(task, tmp)
    return _publish(tmp, out)


def export_adapter(
    task, global_arrays: Mapping[str, np.ndarray], adapter: Mapping[str, np.ndarray], out: Path, *, label_names: Sequence[str] = ()
) -> Path:
    """``out/adapter``: a peft LoRA adapter on the base model (and ``out/base`` for a classifier)."""
    from peft import LoraConfig, get_peft_model

    modules = sorted(k.removesuffix(keys.LORA_A) for k in adapter if k.endswith(keys.LORA_A))
    if not modules:
        raise ValueError("export_adapter: no adapter factors (the strategy keeps no global adapter: export --format merged)")
    rank = int(adapter[modules[0] + keys.LORA_A].shape[0])
    _, head = split_global(dict(global_arrays))
    base = task.load_model()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(base, EncoderClassifier):
        base = hf_classifier(base, label_names)
        tmp = _fresh(out / "base")
        base.save_pretrained(tmp)
        _save_tokenizer(task, tmp)
        base_path, task_type, extra = str(_publish(tmp, out / "base")), "SEQ_CLS", {"modules_to_save": ["head"]}
    else:
        base_path, task_type, extra = task.model_path, "CAUSAL_LM", {}
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=modules, lora_dropout=0.0, bias="none",
                        task_type=task_type, **extra)  # alpha = r: scaling 1, it is in B
    base.name_or_path = base_path  # what peft writes as the adapter's base_model_name_or_path
    peft_model = get_peft_model(base, config)
    inner = peft_model.base_model.model
    with torch.no_grad():
        for m in modules:
            layer = inner.get_submodule(m)
            layer.lora_A["default"].weight.copy_(torch.from_numpy(np.asarray(adapter[m + keys.LORA_A], np.float32)))
            layer.lora_B["default"].weight.copy_(torch.from_numpy(np.asarray(adapter[m + keys.LORA_B], np.float32)))
        if head:
            saved = inner.head.modules_to_save["default"]
            saved.load_state_dict({k.removeprefix("head."): torch.from_numpy(np.asarray(v)) for k, v in head.items()})
    tmp = _fresh(out / "adapter")
    peft_model.save_pretrained(tmp)
    _save_tokenizer(task, tmp)
    return _publish(tmp, out / "adapter")


# --- the early-exit model ---------------------------------------------------------------------
def export_early_exit(model, out: Path, *, structure: Mapping, label_names: Sequence[str], thresholds: Sequence[float]) -> Path:
    """``out``: ``model.safetensors`` (every parameter and buffer of the early-exit model)
    and ``early-exit.json``: what :func:`load_early_exit` rebuilds it from (``structure``:
    the keyword arguments of ml.early_exit.build_model but the task), the exits' blocks,
    the labels and the confidence thresholds the run reported."""
    from safetensors.torch import save_file

    tmp = _fresh(out)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    info = {
        "format": "stamen-early-exit",
        "version": 1,
        "structure": dict(structure),
        "exit_blocks": list(model.exit_blocks),
        "num_blocks": model.num_blocks,
        "id2label": {str(i): n for i, n in enumerate(label_names)},
        "thresholds": list(thresholds),
    }
    (tmp / EARLY_EXIT_FILE).write_text(json.dumps(info, indent=2))
    return _publish(tmp, out)


def load_early_exit(path: str | Path):
    """The early-exit model of :func:`export_early_exit`, in eval mode, with every exit."""
    from safetensors.torch import load_file

    from .early_exit import build_model
    from .tasks import make_task

    path = Path(path)
    info = json.loads((path / EARLY_EXIT_FILE).read_text())
    structure = dict(info["structure"])
    task = make_task(structure.pop("task"), structure.pop("model_path"), max_seq_len=structure.pop("max_seq_len"), num_labels=len(info["id2label"]))
    model = build_model(task, **structure)
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    return model.eval()
