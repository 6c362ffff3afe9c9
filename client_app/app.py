"""The ClientApp: ``query`` answers with the device profile, ``train`` fine-tunes a fresh
LoRA of the node's rank on the current global model and sends the factors back."""

from __future__ import annotations

import logging
import time

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from stamen import keys
from stamen.config import StamenConfig
from strategies.lora_records import factors_to_arrays, from_record, split_global, to_record

from .device import detect_profile
from .sync import apply_downlink

log = logging.getLogger("stamen.client")
app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    profile = detect_profile(dict(context.node_config))
    return Message(RecordDict({keys.PROFILE: ConfigRecord(profile)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    import torch

    from ml.lora import attach_fresh_lora, lora_factors
    from ml.model import head_state, load_adapted_weights, load_head_state, target_module_names
    from ml.tasks import build_task, pick_device, train_local

    t_start = time.perf_counter()
    cfg = StamenConfig.from_run_config(context.run_config)
    node = context.node_config
    instr = msg.content.config_records[keys.CONFIG]
    server_round, rank, alpha = int(instr[keys.SERVER_ROUND]), int(instr[keys.LORA_RANK]), float(instr[keys.LORA_ALPHA])
    partition_id = int(node.get(keys.NODE_PARTITION_ID, 0))
    torch.set_num_threads(int(node.get(keys.NODE_NUM_THREADS, torch.get_num_threads())))

    task, split = build_task(cfg)
    data = split.partition(
        partition_id=partition_id,
        num_partitions=int(node.get(keys.NODE_NUM_PARTITIONS, 1)),
        alpha=cfg.data.dirichlet_alpha,
        seed=cfg.data.seed,
    )
    model = task.load_model().to(pick_device(str(node.get(keys.NODE_DEVICE, "auto"))))
    targets = target_module_names(model, cfg.lora.target_modules)

    # The global model: adapted weights from the downlink (and the node's state), the head.
    down = from_record(msg.content.array_records[keys.ARRAYS])
    held, held_version = _held_global(context)
    weights = apply_downlink(
        held,
        held_version,
        down,
        mode=str(instr[keys.SYNC_MODE]),
        from_version=int(instr[keys.FROM_VERSION]),
        to_version=int(instr[keys.TO_VERSION]),
    )
    context.state[keys.STATE_GLOBAL] = to_record(weights)
    context.state[keys.STATE_META] = ConfigRecord({"version": int(instr[keys.TO_VERSION])})
    load_adapted_weights(model, weights)
    load_head_state(model, split_global(down)[1])
    t_prepared = time.perf_counter()

    model = attach_fresh_lora(model, targets, rank=rank, alpha=alpha, seed=cfg.train.seed + 1000 * server_round + partition_id)
    loss = train_local(
        model,
        task,
        data,
        steps=cfg.train.local_steps,
        batch_size=cfg.train.batch_size,
        learning_rate=cfg.train.learning_rate,
        head_learning_rate=cfg.train.head_learning_rate,
        seed=cfg.train.seed + 7919 * server_round + partition_id,
    )
    t_trained = time.perf_counter()

    update = {**factors_to_arrays(lora_factors(model, targets)), **head_state(model)}
    metrics = MetricRecord(
        {
            keys.NUM_EXAMPLES: len(data),
            keys.TRAIN_LOSS: loss,
            keys.LORA_RANK: rank,
            keys.LORA_ALPHA: alpha,
            "prepare-s": t_prepared - t_start,
            "train-loop-s": t_trained - t_prepared,
        }
    )
    log.info("round %d: partition %d, %d examples, rank %d, loss %.4f", server_round, partition_id, len(data), rank, loss)
    return Message(RecordDict({keys.ARRAYS: to_record(update), keys.METRICS: metrics}), reply_to=msg)


def _held_global(context: Context) -> tuple[dict[str, np.ndarray] | None, int]:
    if keys.STATE_GLOBAL not in context.state.array_records:
        return None, -1
    record: ArrayRecord = context.state.array_records[keys.STATE_GLOBAL]
    return from_record(record), int(context.state.config_records[keys.STATE_META]["version"])
