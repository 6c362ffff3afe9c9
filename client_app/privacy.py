"""A node's side of ``dp.mode = "local"``: this round's DP-SGD parameters, the budget check
before anything trains, the ledger kept in ``context.state`` across rounds, and the reply
metrics (ml/privacy.py does the training; docs/privacy.md explains it all)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from ml.privacy import Ledger, noise_for_budget, sample_rate
from stamen import keys
from stamen.config import StamenConfig

log = logging.getLogger("stamen.client")


@dataclass(frozen=True)
class RoundPrivacy:
    """What DP-SGD does on this node this round, and what it has spent before it."""

    noise_multiplier: float
    max_grad_norm: float
    rate: float
    steps: int
    delta: float
    budget: float  # epsilon the node may spend over the run; inf = no limit
    ledger: Ledger  # spent before this round

    @classmethod
    def plan(cls, cfg: StamenConfig, context: Context, num_examples: int) -> RoundPrivacy:
        """The noise is ``dp.noise-multiplier``, or, with only a target ``dp.epsilon``, the
        noise that spends exactly that over ``strategy.num-rounds`` rounds of
        ``train.local-steps`` steps (a node sampled in fewer rounds spends less)."""
        dp = cfg.dp
        rate = sample_rate(num_examples, cfg.train.batch_size)
        noise = dp.noise_multiplier
        if noise == 0:
            noise = noise_for_budget(
                epsilon=dp.epsilon, delta=dp.delta, rate=rate, steps=cfg.strategy.num_rounds * cfg.train.local_steps
            )
        from strategies.lora_records import from_record

        held = context.state.array_records.get(keys.STATE_DP_LEDGER)
        ledger = Ledger.from_array(from_record(held)["history"]) if held is not None else Ledger()
        return cls(
            noise_multiplier=noise,
            max_grad_norm=dp.max_grad_norm,
            rate=rate,
            steps=cfg.train.local_steps,
            delta=dp.delta,
            budget=dp.epsilon if dp.epsilon > 0 else math.inf,
            ledger=ledger,
        )

    def epsilon_after(self) -> float:
        """Epsilon after this round's steps, should the node train."""
        return self.ledger.after(self.noise_multiplier, self.rate, self.steps).epsilon(self.delta)

    def exhausted(self) -> bool:
        # Opacus's noise search stops within 1% of the target; that much over is the target itself
        return self.epsilon_after() > self.budget * 1.01

    def train_options(self) -> dict:
        """The DP-SGD keyword arguments of ``ml.privacy.train_private``."""
        return {"noise_multiplier": self.noise_multiplier, "max_grad_norm": self.max_grad_norm, "ledger": self.ledger}

    def log_spent(self, server_round: int, metrics: dict[str, float]) -> None:
        log.info(
            "round %d: DP-SGD noise %.3f, epsilon %.3f spent (delta %g)",
            server_round, metrics[keys.DP_NOISE], metrics[keys.DP_EPSILON], metrics[keys.DP_DELTA],
        )

    def save(self, context: Context, ledger: Ledger) -> None:
        from strategies.lora_records import to_record

        context.state[keys.STATE_DP_LEDGER] = to_record({"history": ledger.to_array()})

    def spend(self, context: Context, ledger: Ledger) -> dict[str, float]:
        """After training: keep ``ledger`` (this round included) in the node state and
        return the reply's DP metrics."""
        self.save(context, ledger)
        return self.metrics(ledger)

    def metrics(self, ledger: Ledger) -> dict[str, float]:
        return {
            keys.DP_EPSILON: ledger.epsilon(self.delta),
            keys.DP_DELTA: self.delta,
            keys.DP_NOISE: self.noise_multiplier,
            keys.DP_SAMPLE_RATE: self.rate,
            keys.DP_STEPS: ledger.steps,
        }

    def stop_reply(self, msg: Message, server_round: int) -> Message:
        """The reply of a node whose budget this round would exceed: no update, the reason."""
        spent = self.ledger.epsilon(self.delta)
        reason = (
            f"privacy budget: epsilon {spent:.3f} spent, this round would reach {self.epsilon_after():.3f} "
            f"> dp.epsilon {self.budget:g} (delta {self.delta:g}); this node trains no more in this run"
        )
        log.warning("round %d: %s", server_round, reason)
        metrics = MetricRecord({keys.NUM_EXAMPLES: 0, keys.DP_STOPPED: 1, **self.metrics(self.ledger)})
        return Message(
            RecordDict({keys.ARRAYS: ArrayRecord(), keys.METRICS: metrics, keys.DP_STATUS: ConfigRecord({"reason": reason})}),
            reply_to=msg,
        )
