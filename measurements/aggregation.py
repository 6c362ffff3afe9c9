"""Server-side phase timing of any strategy, by composition (like Flower's DP wrappers).

``TimedStrategy(strategy)`` is itself a Strategy: Flower's ``Strategy.start`` drives it,
it hands every call to the wrapped strategy, and it measures on the server clock:

* ``configure_s``: building the round's messages (``configure_train``);
* ``aggregation_s``: ``aggregate_train`` on the replies in hand;
* ``round_s``: from the start of ``configure_train`` to the end of ``aggregate_train``
  (the downlink, training, uplink and Flower's polling of every node);
* per message, through ``TimingGrid``: when it was sent and when its reply came back.

It also takes the device-side events that replies carry (``stamen.telemetry``, the
path used when the telemetry collector did not get them) into the run's
``TelemetryStore``. Every strategy of the project gets all this without code of its own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from stamen import keys
from stamen.wrapping import StrategyWrapper

from . import events as ev
from .grid import TimingGrid, payload_bytes
from .telemetry import VIA_REPLY, TelemetryStore

log = logging.getLogger("stamen.measurements")


@dataclass
class RoundTiming:
    server_round: int
    configure_s: float = 0.0
    aggregation_s: float = 0.0
    round_s: float = 0.0
    sent: list[int] = field(default_factory=list)  # node ids a train message went to
    replied: list[int] = field(default_factory=list)
    errors: list[int] = field(default_factory=list)  # replies that carried an error
    outcomes: dict[int, tuple[str, str]] = field(default_factory=dict)  # node -> (status, reason) from the strategy
    payload_down_bytes: int = 0  # arrays of all train messages (before framing)
    started_at: float = 0.0  # server wall clock (time.time()) at configure_train
    started_perf: float | None = field(default=None, repr=False)  # monotonic clock, same instant
    clock: str = "measured"  # "simulated": round_s is the simulated clock's (measurements/clock.py)

    @property
    def late(self) -> list[int]:
        """Nodes that did not reply before the round's timeout."""
        return sorted(set(self.sent) - set(self.replied))

    @property
    def rejected(self) -> list[int]:
        """Nodes that replied without an error and whose update the strategy refused."""
        return sorted(n for n, (status, _) in self.outcomes.items() if status == "rejected" and n in self.replied and n not in self.errors)

    @property
    def accepted(self) -> list[int]:
        """Nodes whose update went into the aggregate."""
        return sorted(set(self.replied) - set(self.errors) - set(self.rejected))

    def outcome_of(self, status: str) -> list[int]:
        return sorted(n for n, (s, _) in self.outcomes.items() if s == status)


def ingest_replies(replies: Iterable[Message], store: TelemetryStore) -> int:
    """Move the events that replies carry into ``store``; a malformed record is logged and
    skipped (a node's telemetry never breaks a round). Returns how many were read."""
    count = 0
    for reply in replies:
        if reply.has_error() or keys.TELEMETRY not in reply.content.config_records:
            continue
        try:
            events = ev.loads(str(reply.content.config_records[keys.TELEMETRY][keys.TELEMETRY_EVENTS]))
        except (KeyError, ValueError, TypeError) as err:
            log.warning("node %s sent unreadable telemetry: %s", reply.metadata.src_node_id, err)
            continue
        store.add(events, VIA_REPLY, sender=int(reply.metadata.src_node_id))  # the server knows who sent the reply
        count += len(events)
    return count


class TimedStrategy(StrategyWrapper):
    def __init__(
        self,
        strategy: Strategy,
        *,
        on_round: Callable[[RoundTiming], None] | None = None,
        telemetry: TelemetryStore | None = None,
        auth=None,
    ) -> None:
        super().__init__(strategy)
        self.auth = auth  # measurements/auth.py: the nodes' telemetry keys travel in the messages
        self.on_round = on_round
        self.telemetry = telemetry if telemetry is not None else TelemetryStore()
        self.timings: dict[int, RoundTiming] = {}
        self.grid: TimingGrid | None = None

    def start(self, grid: Grid, *args, **kwargs):
        """Flower's own round loop, run on a TimingGrid around ``grid``."""
        self.grid = grid if isinstance(grid, TimingGrid) else TimingGrid(grid, auth=self.auth)
        return super().start(self.grid, *args, **kwargs)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        timing = self.timings[server_round] = RoundTiming(
            server_round, started_at=time.time(), started_perf=time.perf_counter()
        )
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        timing.configure_s = time.perf_counter() - timing.started_perf
        for m in messages:
            if not m.metadata.group_id:  # ties each message to its round in clients.csv
                m.metadata.group_id = str(server_round)
        timing.sent = [m.metadata.dst_node_id for m in messages]
        timing.payload_down_bytes = sum(payload_bytes(m) for m in messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        timing = self.timings.setdefault(server_round, RoundTiming(server_round))
        timing.replied = [m.metadata.src_node_id for m in replies]
        timing.errors = [m.metadata.src_node_id for m in replies if m.has_error()]
        t0 = time.perf_counter()
        result = self.strategy.aggregate_train(server_round, replies)
        t1 = time.perf_counter()
        timing.aggregation_s = t1 - t0
        timing.round_s = t1 - (timing.started_perf if timing.started_perf is not None else t0)
        outcomes = getattr(self.strategy, "round_outcomes", None)  # what it did with each reply, if it says
        timing.outcomes = dict(outcomes(server_round)) if callable(outcomes) else {}
        ingest_replies(replies, self.telemetry)
        if self.on_round is not None:
            self.on_round(timing)
        return result

    def aggregate_evaluate(self, server_round, replies) -> MetricRecord | None:
        replies = list(replies)
        ingest_replies(replies, self.telemetry)
        return self.strategy.aggregate_evaluate(server_round, replies)
