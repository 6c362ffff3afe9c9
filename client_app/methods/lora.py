"""The LoRA family's round on a node, and plain LoRA (FLoRA, FedIT, FlexLoRA).

:class:`LoRAMethod` is the template every LoRA method runs: build this round's model
(the global model, a LoRA of the node's rank, fresh or as sent), check the privacy
budget, train, serialize the factors and the head, reply. A method changes it through
three hooks and nothing else:

- :meth:`~LoRAMethod.regularizer`: a term added to every step's loss (HetLoRA's tail);
- :meth:`~LoRAMethod.train`: how the steps run (FedSpine prunes while it trains);
- :meth:`~LoRAMethod.reply`: what the reply carries besides the factors and the head.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from measurements.client_mod import transport
from measurements.phases import phase
from ml.cache import cached
from stamen import keys
from stamen.config import StamenConfig
from stamen.records import factors_to_arrays, from_record, init_factors, split_global, to_record

from ..privacy import RoundPrivacy
from ..sync import apply_downlink, keeps_global
from ..task import loop_seed, node_task_and_data
from .registry import register

log = logging.getLogger("stamen.client")


@dataclass
class LoRARound:
    """What one train instruction gives a LoRA method to work with."""

    msg: Message
    context: Context
    cfg: StamenConfig
    instr: ConfigRecord
    task: object
    data: object
    model: object
    targets: list[str]
    privacy: RoundPrivacy | None  # dp.mode = "local": this round's DP-SGD plan
    options: dict = field(default_factory=dict)  # ml.loop.train's keyword arguments

    @property
    def server_round(self) -> int:
        return int(self.instr[keys.SERVER_ROUND])

    @property
    def dpsgd(self):
        """``ml.loop.train``'s ``private``: this round's DP-SGD, or None."""
        return self.privacy.dpsgd() if self.privacy is not None else None


@dataclass
class Trained:
    """What training returns to the template."""

    loss: float
    ledger: object | None = None  # DP: the spending including this round
    extra: dict = field(default_factory=dict)  # for the method's own reply hook


@dataclass
class Reply:
    """What the reply carries: the factors, their rank and alpha (a method may change
    them: HetLoRA truncates), extra arrays and metrics."""

    factors: dict
    rank: int
    alpha: float
    arrays: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)


class LoRAMethod:
    """The LoRA round; a method overrides the hooks it needs (module docstring)."""

    def regularizer(self, r: LoRARound) -> Callable | None:
        """``regularizer(model) -> tensor`` added to each step's loss; None: none."""
        return None

    def train(self, r: LoRARound, regularizer: Callable | None) -> Trained:
        """The round's local steps (ml/loop.py): AdamW, DP-SGD under ``dp.mode = "local"``."""
        from ml import loop

        result = loop.train(r.model, r.task, r.data, regularizer=regularizer, private=r.dpsgd, **r.options)
        return Trained(result.loss, result.ledger)

    def reply(self, r: LoRARound, trained: Trained, out: Reply) -> Reply:
        """The reply as it stands after training (factors, rank, alpha); returns it changed."""
        return out

    # --- the template ---------------------------------------------------------------
    def run(self, msg: Message, context: Context, cfg: StamenConfig) -> Message:
        instr = msg.content.config_records[keys.CONFIG]
        server_round = int(instr[keys.SERVER_ROUND])
        partition_id = int(context.node_config.get(keys.NODE_PARTITION_ID, 0))
        with phase("load"):  # the ML libraries, model, data, the downlinked global weights, the LoRA
            from ml.lora import lora_factors
            from ml.model import head_state

            task, data, model, targets = prepare(msg, context, cfg)
        privacy = RoundPrivacy.for_round(cfg, context, len(data), instr.get(keys.LEDGER_RUN))
        if privacy is not None and privacy.exhausted():  # DP-SGD: the budget is checked before anything trains
            return privacy.stop_reply(msg, server_round)
        options = {
            "steps": cfg.train.local_steps,
            "batch_size": cfg.train.batch_size,
            "learning_rate": cfg.train.learning_rate,
            "head_learning_rate": cfg.train.head_learning_rate,
            "seed": loop_seed(cfg, server_round, partition_id),
        }
        r = LoRARound(msg, context, cfg, instr, task, data, model, targets, privacy, options)
        with phase("loop"):
            trained = self.train(r, self.regularizer(r))
        dp_metrics = privacy.spend(context, trained.ledger) if privacy is not None else {}
        with phase("serialize"):
            out = Reply(lora_factors(model, targets), int(instr[keys.LORA_RANK]), float(instr[keys.LORA_ALPHA]))
            out = self.reply(r, trained, out)
            update = to_record({**factors_to_arrays(out.factors), **head_state(model), **out.arrays})
        metrics = MetricRecord(
            {
                keys.NUM_EXAMPLES: len(data),
                keys.TRAIN_LOSS: trained.loss,
                keys.LORA_RANK: out.rank,
                keys.LORA_ALPHA: out.alpha,
                **out.metrics,
                **dp_metrics,
            }
        )
        log.info("round %d: partition %d, %d examples, rank %d, loss %.4f", server_round, partition_id, len(data), out.rank, trained.loss)
        if dp_metrics:
            privacy.log_spent(server_round, dp_metrics)
        return Message(RecordDict({keys.ARRAYS: update, keys.METRICS: metrics}), reply_to=msg)


@register("lora")
class PlainLoRA(LoRAMethod):
    """FLoRA, FedIT, FlexLoRA: the template as it is. The server decides what the LoRA
    starts from (fresh, or the adapter it sent) and how the replies combine."""


def prepare(msg: Message, context: Context, cfg: StamenConfig):
    """The model this round trains: the global model (from the downlink and the node's
    state) with a LoRA of the node's rank (fresh, or the adapter the server sent), and
    the node's task and data partition."""
    from ml.lora import attach_fresh_lora, load_lora_factors
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

    down = dict(from_record(msg.content.array_records[keys.ARRAYS]))
    start = initial_factors(down)  # removes the init.* arrays from `down`
    held, held_version = held_global(context)
    weights = apply_downlink(
        held,
        held_version,
        down,
        mode=str(instr[keys.SYNC_MODE]),
        from_version=int(instr[keys.FROM_VERSION]),
        to_version=int(instr[keys.TO_VERSION]),
    )
    if keeps_global(transport(), cfg.simulation.keep_global):  # for the next round's delta downlink (client_app/sync.py)
        context.state[keys.STATE_GLOBAL] = to_record(weights)
        context.state[keys.STATE_META] = ConfigRecord({"version": int(instr[keys.TO_VERSION])})
    load_adapted_weights(model, weights)
    load_head_state(model, split_global(down)[1])
    seed = cfg.train.seed + 1000 * server_round + partition_id
    model = attach_fresh_lora(model, targets, rank=int(instr[keys.LORA_RANK]), alpha=float(instr[keys.LORA_ALPHA]), seed=seed)
    if start:
        load_lora_factors(model, start)
    return task, data, model, targets


def initial_factors(down: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Take the adapter the server sent (``init.<module>.lora_A/B``) out of the downlink."""
    start = init_factors(down)
    for k in [k for k in down if k.startswith(keys.INIT_PREFIX)]:
        del down[k]
    return start


def held_global(context: Context) -> tuple[dict[str, np.ndarray] | None, int]:
    if keys.STATE_GLOBAL not in context.state.array_records:
        return None, -1
    record: ArrayRecord = context.state.array_records[keys.STATE_GLOBAL]
    return from_record(record), int(context.state.config_records[keys.STATE_META]["version"])
