"""The early-exit family's round on a node (ReeFL and its baselines): build the model up
to this node's deepest exit, load what the server sent, train with the method's
objective, send back the same parameters.

:class:`EarlyExitMethod` is the template; a method is its objective, :meth:`loss`, built
from the pieces in ml/early_exit.py (one file each: reefl.py, depthfl.py, inclusivefl.py,
exclusivefl.py). The loop hands every method the teacher (the exit with the lowest
moving-average loss); ReeFL distils from it, the others ignore it.
"""

from __future__ import annotations

import logging

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from measurements.phases import phase
from stamen import keys
from stamen.config import StamenConfig
from stamen.records import from_record, to_record

from ..privacy import RoundPrivacy
from ..task import loop_seed, node_task_and_data

log = logging.getLogger("stamen.client")


class EarlyExitMethod:
    """The early-exit round; a method overrides :meth:`loss`."""

    def loss(self, logits, labels: torch.Tensor, *, teacher: int, distill_weight: float, temperature: float):
        """(loss to minimise, per-exit cross-entropy detached) of one batch."""
        raise NotImplementedError

    def run(self, msg: Message, context: Context, cfg: StamenConfig) -> Message:
        instr = msg.content.config_records[keys.CONFIG]
        server_round, max_exit = int(instr[keys.SERVER_ROUND]), int(instr[keys.MAX_EXIT])
        partition_id = int(context.node_config.get(keys.NODE_PARTITION_ID, 0))
        with phase("load"):
            from ml import early_exit
            from ml.tasks import pick_device

            task, data = node_task_and_data(context, cfg)
            model = early_exit.model_from_config(task, cfg, exit_kind=str(instr[keys.EXIT_KIND]), max_exit=max_exit)
            down = from_record(msg.content.array_records[keys.ARRAYS])
            model.load_trainable_state(down)
            # train only what goes back (InclusiveFL: one head) and what the forward uses (a
            # one-block model has no modulation gate): DP-SGD would otherwise noise them
            idle = model.idle_parameters()
            for name, param in model.named_parameters():
                if name not in down or name in idle:
                    param.requires_grad_(False)
            model.to(pick_device(str(context.node_config.get(keys.NODE_DEVICE, "auto"))))
            held = context.state.config_records.get(keys.STATE_EXIT_LOSS_EMA)
            ema = [float(x) for x in held["ema"]] if held is not None else []
        privacy = RoundPrivacy.for_round(cfg, context, len(data), instr.get(keys.LEDGER_RUN))
        if privacy is not None and privacy.exhausted():  # DP-SGD: the budget is checked before anything trains
            return privacy.stop_reply(msg, server_round)
        with phase("loop"):
            result = early_exit.train_early_exit(
                model,
                task,
                data,
                objective=self.loss,
                steps=cfg.train.local_steps,
                batch_size=cfg.train.batch_size,
                learning_rate=cfg.train.learning_rate,
                exit_learning_rate=cfg.train.head_learning_rate,
                seed=loop_seed(cfg, server_round, partition_id),
                distill_weight=float(instr[keys.DISTILL_WEIGHT]),
                temperature=cfg.early_exit.distill_temperature,
                loss_ema=ema,
                ema_decay=cfg.early_exit.loss_ema,
                private=privacy.dpsgd() if privacy is not None else None,
            )
        dp_metrics = privacy.spend(context, result["ledger"]) if privacy is not None else {}
        with phase("serialize"):
            params = dict(model.named_parameters())
            update = to_record({k: params[k].detach().cpu().numpy() for k in down})  # exactly what this node was sent
            context.state[keys.STATE_EXIT_LOSS_EMA] = ConfigRecord({"ema": result["loss_ema"]})
        metrics = MetricRecord(
            {
                keys.NUM_EXAMPLES: len(data),
                keys.TRAIN_LOSS: result["loss"],
                keys.MAX_EXIT: max_exit,
                keys.EXIT_LOSSES: result["exit_losses"],
                keys.TEACHER_EXIT: result["teacher"] + 1,
                **dp_metrics,
            }
        )
        log.info(
            "round %d: partition %d, %d examples, max exit %d (%d blocks), loss %.4f, exit losses %s",
            server_round, partition_id, len(data), max_exit, model.blocks_run, result["loss"],
            " ".join(f"{x:.3f}" for x in result["exit_losses"]),
        )
        if dp_metrics:
            privacy.log_spent(server_round, dp_metrics)
        return Message(RecordDict({keys.ARRAYS: update, keys.METRICS: metrics}), reply_to=msg)
