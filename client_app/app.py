"""The ClientApp: ``query`` answers with the device profile, ``train`` fine-tunes a LoRA of
the node's rank (fresh, or the one the server sent) on the current global model and sends
the factors back."""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from measurements.client_mod import measurement_mod
from measurements.phases import phase
from ml.cache import cached
from stamen import keys
from stamen.config import EARLY_EXIT_STRATEGIES, StamenConfig
from stamen.lora_math import self_prune_rank, truncate
from stamen.records import factors_to_arrays, from_record, split_global, to_record

from .device import detect_profile
from .early_exit import train_early_exit
from .sync import apply_downlink
from .task import node_task_and_data, task_and_partition

log = logging.getLogger("stamen.client")
app = ClientApp(mods=[measurement_mod])  # phase timings and resource samples: measurements/


@app.query()
def query(msg: Message, context: Context) -> Message:
    if msg.content.config_records.get(keys.CONFIG, {}).get(keys.FLUSH):
        return Message(RecordDict(), reply_to=msg)  # the mod attaches the events this node still holds
    profile = detect_profile(dict(context.node_config))
    return Message(RecordDict({keys.PROFILE: ConfigRecord(profile)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = StamenConfig.from_run_config(context.run_config)
    instr = msg.content.config_records[keys.CONFIG]
    if keys.MAX_EXIT in instr:  # an early-exit strategy (ReeFL and its baselines)
        return train_early_exit(msg, context, cfg)
    server_round = int(instr[keys.SERVER_ROUND])
    partition_id = int(context.node_config.get(keys.NODE_PARTITION_ID, 0))
    with phase("load"):  # the ML libraries, model, data, the downlinked global weights, the LoRA
        from ml.lora import lora_factors, tail_norm
        from ml.model import head_state
        from ml.tasks import train_local

        task, data, model, targets = _prepare(msg, context, cfg)
    penalty = float(instr.get(keys.TAIL_PENALTY, 0.0))
    regularizer = None
    if penalty > 0:  # HetLoRA: push the tail rank components toward zero
        fraction = float(instr[keys.TAIL_FRACTION])
        regularizer = lambda m: penalty * tail_norm(m, targets, fraction)  # noqa: E731

    privacy = None
    if cfg.dp.local:  # DP-SGD: check the budget before anything trains
        from .privacy import RoundPrivacy

        privacy = RoundPrivacy.plan(cfg, context, len(data))
        if privacy.exhausted():
            return privacy.stop_reply(msg, server_round)

    pruned, dp_metrics = None, {}
    with phase("loop"):
        options = {
            "steps": cfg.train.local_steps,
            "batch_size": cfg.train.batch_size,
            "learning_rate": cfg.train.learning_rate,
            "head_learning_rate": cfg.train.head_learning_rate,
            "seed": cfg.train.seed + 7919 * server_round + partition_id,
        }
        if keys.PRUNE_RATIO in instr:  # FedSpine: prune heads and channels while training
            private = privacy.train_options() if privacy is not None else None
            pruned = _train_pruned(model, task, data, float(instr[keys.PRUNE_RATIO]), context, dict(options, private=private))
            loss = pruned["loss"]
            if privacy is not None:
                dp_metrics = privacy.spend(context, pruned["ledger"])
        elif privacy is not None:
            from ml.privacy import train_private

            result = train_private(model, task, data, regularizer=regularizer, **privacy.train_options(), **options)
            loss, dp_metrics = result.loss, privacy.spend(context, result.ledger)
        else:
            loss = train_local(model, task, data, regularizer=regularizer, **options)
    rank, alpha = int(instr[keys.LORA_RANK]), float(instr[keys.LORA_ALPHA])
    with phase("serialize"):
        factors = lora_factors(model, targets)
        if keys.PRUNE_THRESHOLD in instr:  # HetLoRA: drop a tail that training made negligible
            kept = self_prune_rank(factors, rho=float(instr[keys.TAIL_FRACTION]), threshold=float(instr[keys.PRUNE_THRESHOLD]))
            if kept < rank:
                log.info("round %d: HetLoRA self-pruning, rank %d -> %d", server_round, rank, kept)
                # the kept components keep their scaling: alpha / rank stays the same
                factors, alpha, rank = truncate(factors, kept), alpha * kept / rank, kept
        arrays = {**factors_to_arrays(factors), **head_state(model)}
        if pruned is not None:
            arrays.update(pruned["kept"](targets))
        update = to_record(arrays)
    metrics = MetricRecord(
        {
            keys.NUM_EXAMPLES: len(data),
            keys.TRAIN_LOSS: loss,
            keys.LORA_RANK: rank,
            keys.LORA_ALPHA: alpha,
            **({keys.LOSS_START: pruned["loss_start"], keys.LOSS_END: pruned["loss_end"],
                keys.LOSS_REFERENCE: pruned["loss_reference"], keys.LOSS_AFTER: pruned["loss_after"]} if pruned else {}),
            **dp_metrics,
        }
    )
    log.info("round %d: partition %d, %d examples, rank %d, loss %.4f", server_round, partition_id, len(data), rank, loss)
    if dp_metrics:
        privacy.log_spent(server_round, dp_metrics)
    return Message(RecordDict({keys.ARRAYS: update, keys.METRICS: metrics}), reply_to=msg)


def _prepare(msg: Message, context: Context, cfg: StamenConfig):
    """The model this round trains: the global model (from the downlink and the node's
    state) with a fresh LoRA of the node's rank, and the node's data partition."""
    from ml.lora import attach_fresh_lora
    from ml.model import load_adapted_weights, load_head_state, target_module_names
    from ml.tasks import pick_device

    node = context.node_config
    instr = msg.content.config_records[keys.CONFIG]
    server_round = int(instr[keys.SERVER_ROUND])
    partition_id = int(node.get(keys.NODE_PARTITION_ID, 0))
    task, data = node_task_and_data(context, cfg)
    model = cached(("model", cfg.model, cfg.data), task.load_model, once=True)  # this message changes it
    model = model.to(pick_device(str(node.get(keys.NODE_DEVICE, "auto"))))
    targets = target_module_names(model, cfg.lora.target_modules)

    down = from_record(msg.content.array_records[keys.ARRAYS])
    start = _initial_factors(down)  # removes the init.* arrays from `down`
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
    seed = cfg.train.seed + 1000 * server_round + partition_id
    model = attach_fresh_lora(
        model, targets, rank=int(instr[keys.LORA_RANK]), alpha=float(instr[keys.LORA_ALPHA]), seed=seed
    )
    if start:
        from ml.lora import load_lora_factors

        load_lora_factors(model, start)
    return task, data, model, targets


def _train_pruned(model, task, data, ratio: float, context: Context, options: dict) -> dict:
    """Gradual structured pruning while training (ml/pruning.py), with the unit scores this
    node kept from earlier rounds; returns train_pruned's result, its "kept" turned into a
    function of the adapted modules -> the reply's kept.<module>.rows/.cols arrays."""
    from ml import pruning

    groups = pruning.unit_groups(model)  # before pruning: the unpruned coordinates
    held = context.state.array_records.get(keys.STATE_PRUNE_SCORES)
    scores = from_record(held) if held is not None else None
    result = pruning.train_pruned(model, task, data, ratio=ratio, scores=scores, **options)
    context.state[keys.STATE_PRUNE_SCORES] = to_record(result["scores"])
    indices = pruning.module_indices(groups, result["kept"])

    def kept_arrays(targets: list[str]) -> dict[str, np.ndarray]:
        """A side no pruning touched is whole: all of its (unchanged) indices."""
        out = {}
        for module in targets:
            rows, cols = indices.get(module, (None, None))
            out_dim, in_dim = pruning.weight_of(model.get_submodule(module)).shape
            out[keys.KEPT_PREFIX + module + keys.KEPT_ROWS] = np.arange(out_dim, dtype=np.int64) if rows is None else rows
            out[keys.KEPT_PREFIX + module + keys.KEPT_COLS] = np.arange(in_dim, dtype=np.int64) if cols is None else cols
        return out

    return {**result, "kept": kept_arrays}


def preload(context: Context) -> None:
    """The warm runtime's hook (device_runtime/executor.py): load, once per run and before
    the next message arrives, what every message of this run builds the same way: the
    libraries, the task and data split, this node's partition and the base model.

    Runs in the executor, whose memory the workers share copy-on-write, so nothing here
    may start threads or touch CUDA (the model stays on the CPU; each message moves its
    own copy to the device)."""
    cfg = StamenConfig.from_run_config(context.run_config)
    task, _ = task_and_partition(context, cfg)
    if cfg.strategy.name not in EARLY_EXIT_STRATEGIES:  # they build their model from the backbone
        cached(("model", cfg.model, cfg.data), task.load_model, once=True)


def _initial_factors(down: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Take the adapter the server sent (``init.<module>.lora_A/B``) out of the downlink."""
    init = {k[len(keys.INIT_PREFIX):]: down.pop(k) for k in [k for k in down if k.startswith(keys.INIT_PREFIX)]}
    modules = {k.removesuffix(keys.LORA_A) for k in init if k.endswith(keys.LORA_A)}
    return {m: (init[m + keys.LORA_A], init[m + keys.LORA_B]) for m in sorted(modules)}


def _held_global(context: Context) -> tuple[dict[str, np.ndarray] | None, int]:
    if keys.STATE_GLOBAL not in context.state.array_records:
        return None, -1
    record: ArrayRecord = context.state.array_records[keys.STATE_GLOBAL]
    return from_record(record), int(context.state.config_records[keys.STATE_META]["version"])
