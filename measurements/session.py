"""The server side of the instrumentation for one run, in one object.

    with MeasurementSession(run_dir, run_id=context.run_id, collector="0.0.0.0:9400") as m:
        grid = m.grid(grid)                        # timed, and carrying each node's telemetry key
        strategy = m.wrap(any_strategy)            # rounds.csv, and clients.csv as rounds end
        strategy.start(grid, ...)
        m.finish(grid, node_ids, timeout=60)       # the last uplinks; final clients.csv

``run_dir`` is anything with ``append_round_timing(RoundTiming)`` and
``write_table(name, columns, rows)`` (server_app/run_dir.py's RunDirectory).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp.strategy import Strategy

from stamen import keys

from .aggregation import RoundTiming, TimedStrategy, ingest_replies
from .auth import TelemetryAuth
from .grid import TimingGrid
from .tables import ACCEPTED, CLIENTS_COLUMNS, RESOURCES_COLUMNS, client_rows, resource_rows
from .telemetry import TelemetryCollector, TelemetryStore

log = logging.getLogger("stamen.measurements")


class MeasurementSession:
    def __init__(
        self, run_dir, *, run_id: int, collector: str = "", enabled: bool = True, certfile: str = "", keyfile: str = ""
    ) -> None:
        self.run_dir = run_dir
        self.enabled = enabled
        self.auth = TelemetryAuth(run_id) if enabled else None  # keys per node; what the collector keeps
        self.telemetry = TelemetryStore(run_id=run_id, auth=self.auth)
        self.profiles: dict[int, dict[str, Any]] = {}
        self.strategy: TimedStrategy | None = None
        self._collector = (
            TelemetryCollector(collector, self.telemetry, certfile=certfile, keyfile=keyfile) if (enabled and collector) else None
        )
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> MeasurementSession:
        if self._collector is not None:
            self._stack.enter_context(self._collector)
            if self._collector.port:
                log.info("telemetry collector listening on port %d", self._collector.port)
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def grid(self, grid) -> TimingGrid:
        """The grid every message of the run goes through: timed, and carrying each node's
        telemetry key (measurements/auth.py). Pass it to the profile query and the strategy."""
        return grid if isinstance(grid, TimingGrid) else TimingGrid(grid, auth=self.auth)

    def wrap(self, strategy: Strategy) -> TimedStrategy:
        self.strategy = TimedStrategy(strategy, on_round=self._on_round, telemetry=self.telemetry, auth=self.auth)
        return self.strategy

    def take_replies(self, replies) -> None:
        """Events that arrived in replies the strategy never saw (e.g. profile queries)."""
        ingest_replies(replies, self.telemetry)

    def _on_round(self, timing: RoundTiming) -> None:
        self.run_dir.append_round_timing(timing)
        self.write_tables()

    def write_tables(self) -> None:
        """clients.csv and resources.csv as far as the figures go (uplinks fill in late)."""
        grid = self.strategy.grid if self.strategy is not None else None
        sent = grid.messages() if grid is not None else []
        events = self.telemetry.events()
        self.run_dir.write_table("clients.csv", CLIENTS_COLUMNS, client_rows(sent, events, self.profiles, outcomes=self.outcomes()))
        self.run_dir.write_table("resources.csv", RESOURCES_COLUMNS, resource_rows(sent, events))

    def outcomes(self) -> dict[tuple[int, int], tuple[str, str]]:
        """(round, node) -> (status, reason): what the strategy did with each reply."""
        timings = self.strategy.timings if self.strategy is not None else {}
        return {(r, n): o for r, t in timings.items() for n, o in t.outcomes.items()}

    def round_times(self, server_round: int) -> dict[int, float]:
        """{node: seconds} of one round's training message, as measured so far: downlink +
        train + uplink where the node measured all three (stamen-supernode), else the
        server's send-to-reply time (e2e_s). Nodes without a reply are left out."""
        grid = self.strategy.grid if self.strategy is not None else None
        if grid is None:
            return {}
        out = {}
        for row in client_rows(grid.messages(), self.telemetry.events(), self.profiles, outcomes=self.outcomes()):
            if row["round"] != server_round or row["status"] not in ACCEPTED:
                continue
            parts = [row.get(k) for k in ("downlink_s", "train_s", "uplink_s")]
            if all(isinstance(x, (int, float)) for x in parts):
                out[row["node_id"]] = float(sum(parts))
            elif isinstance(row.get("e2e_s"), (int, float)):
                out[row["node_id"]] = float(row["e2e_s"])
        return out

    def finish(self, grid, nodes: list[int], *, timeout: float) -> None:
        """Ask every node for the events it still holds, then write the final tables."""
        if self.enabled and nodes:
            messages = [
                Message(
                    RecordDict({keys.CONFIG: ConfigRecord({keys.FLUSH: True})}), dst_node_id=n, message_type=MessageType.QUERY
                )
                for n in nodes
            ]
            grid = self.strategy.grid if self.strategy is not None and self.strategy.grid is not None else self.grid(grid)
            replies = list(grid.send_and_receive(messages, timeout=timeout))  # through the timed grid: each node's key
            count = ingest_replies(replies, self.telemetry)
            log.info("telemetry: %d late events from %d of %d nodes", count, len(replies), len(nodes))
        self.write_tables()
