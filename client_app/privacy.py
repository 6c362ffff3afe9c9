"""A node's side of ``dp.mode = "local"``: this round's DP-SGD parameters, the budget check
before anything trains, the ledger kept across rounds, and the reply metrics
(ml/privacy.py makes the training private; docs/privacy.md explains it all).

The ledger is kept twice: in ``context.state`` (what the SuperNode holds between rounds)
and in a file on the device's disk, keyed by run and partition (:class:`LedgerFile`). A
restarted SuperNode starts with an empty ``context.state``; the file lets it continue at
the epsilon it has spent instead of 0. Each round takes the longer of the two.

A resumed run (docs/checkpoints.md) is a new Flower run with a new run id. Its
instructions name the run it continues (``ledger-run``): the node reads that run's
ledger file too and takes the longest, and writes both. A name can only add what was
spent, never hide it: the node's own run's ledger is always read."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from ml.privacy import DPSGD, Ledger, noise_for_budget, sample_rate
from stamen import keys
from stamen.config import StamenConfig
from stamen.records import from_record, to_record

log = logging.getLogger("stamen.client")


class LedgerUnreadable(RuntimeError):
    """The ledger file exists but cannot be read: what was spent is unknown, so the node
    does not train."""


@dataclass(frozen=True)
class LedgerFile:
    """``<state dir>/dp-ledger/run-<run id>/partition-<id>.json``: the ledger of the data a
    node trains on in one run. The state dir is node-config ``state-dir``, else
    ``$FLWR_HOME/stamen-state`` (``~/.flwr/stamen-state`` without FLWR_HOME). Written
    atomically (a temporary file, fsync, rename), so a crash leaves the old or the new one."""

    path: Path
    run_id: int
    partition_id: int

    FORMAT = "stamen-dp-ledger"
    VERSION = 1

    @classmethod
    def for_context(cls, context: Context, run_id: int | None = None) -> LedgerFile:
        """This node's ledger of its partition in this run (or in run ``run_id``)."""
        node = context.node_config
        root = node.get(keys.NODE_STATE_DIR) or os.path.join(os.environ.get("FLWR_HOME") or "~/.flwr", "stamen-state")
        partition = int(node.get(keys.NODE_PARTITION_ID, 0))
        run_id = int(context.run_id) if run_id is None else int(run_id)
        path = Path(str(root)).expanduser() / "dp-ledger" / f"run-{run_id}" / f"partition-{partition}.json"
        return cls(path, run_id, partition)

    @classmethod
    def all_for(cls, context: Context, ledger_run) -> tuple[LedgerFile, ...]:
        """This run's ledger file, and that of the run it continues (``ledger-run``, if any)."""
        files = [cls.for_context(context)]
        try:
            other = int(ledger_run) if ledger_run not in (None, "") else None
        except (TypeError, ValueError):
            other = None  # not a run id: nothing to continue
        if other is not None and other != files[0].run_id:
            files.append(cls.for_context(context, other))
        return tuple(files)

    def read(self) -> Ledger | None:
        """The ledger on disk; None when there is none yet."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        except OSError as err:
            raise LedgerUnreadable(f"cannot read the privacy ledger {self.path}: {err}") from err
        try:
            data = json.loads(text)
            if data.get("format") != self.FORMAT or data.get("version") != self.VERSION:
                raise ValueError(f"format {data.get('format')!r} version {data.get('version')!r}, expected {self.FORMAT!r} {self.VERSION}")
            if data.get("run-id") != self.run_id or data.get("partition-id") != self.partition_id:
                raise ValueError(f"it is run {data.get('run-id')} partition {data.get('partition-id')}'s")
            return Ledger([(float(z), float(q), int(n)) for z, q, n in data["history"]])
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise LedgerUnreadable(
                f"the privacy ledger {self.path} is damaged ({err}); what this node spent is unknown, so it does not train"
            ) from err

    def write(self, ledger: Ledger) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {"format": self.FORMAT, "version": self.VERSION, "run-id": self.run_id,
                "partition-id": self.partition_id, "history": [list(h) for h in ledger.history]}
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


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
    files: tuple[LedgerFile, ...] = ()  # where the ledger is kept on disk (LedgerFile.all_for)

    @classmethod
    def for_round(cls, cfg: StamenConfig, context: Context, num_examples: int, ledger_run=None) -> RoundPrivacy | None:
        """This round's plan under ``dp.mode = "local"``; None without it. ``ledger_run``:
        the instruction's ``ledger-run``."""
        return cls.plan(cfg, context, num_examples, ledger_run) if cfg.dp.local else None

    @classmethod
    def plan(cls, cfg: StamenConfig, context: Context, num_examples: int, ledger_run=None) -> RoundPrivacy:
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
        held = context.state.array_records.get(keys.STATE_DP_LEDGER)
        in_state = Ledger.from_array(from_record(held)["history"]) if held is not None else Ledger()
        files = LedgerFile.all_for(context, ledger_run)
        on_disk = [(f, f.read() or Ledger()) for f in files]
        ledger = max([in_state] + [led for _, led in on_disk], key=lambda led: led.steps)  # the longest: a restart emptied the state
        for f, led in on_disk:
            if led.steps > in_state.steps and led is ledger:
                log.info("privacy ledger: %d DP-SGD steps spent before a restart or resume (from %s)", led.steps, f.path)
        return cls(
            noise_multiplier=noise,
            max_grad_norm=dp.max_grad_norm,
            rate=rate,
            steps=cfg.train.local_steps,
            delta=dp.delta,
            budget=dp.epsilon if dp.epsilon > 0 else math.inf,
            ledger=ledger,
            files=files,
        )

    def epsilon_after(self) -> float:
        """Epsilon after this round's steps, should the node train."""
        return self.ledger.after(self.noise_multiplier, self.rate, self.steps).epsilon(self.delta)

    def exhausted(self) -> bool:
        # Opacus's noise search stops within 1% of the target; that much over is the target itself
        return self.epsilon_after() > self.budget * 1.01

    def dpsgd(self) -> DPSGD:
        """What the training loop's DP-SGD takes (``ml.loop.train(private=...)``)."""
        return DPSGD(self.noise_multiplier, self.max_grad_norm, self.ledger)

    def log_spent(self, server_round: int, metrics: dict[str, float]) -> None:
        log.info(
            "round %d: DP-SGD noise %.3f, epsilon %.3f spent (delta %g)",
            server_round, metrics[keys.DP_NOISE], metrics[keys.DP_EPSILON], metrics[keys.DP_DELTA],
        )

    def save(self, context: Context, ledger: Ledger) -> None:
        context.state[keys.STATE_DP_LEDGER] = to_record({"history": ledger.to_array()})
        for f in self.files or (LedgerFile.for_context(context),):
            f.write(ledger)  # before the reply leaves

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
