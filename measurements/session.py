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
from stamen.node_ids import renamed_row

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
        self._grid: TimingGrid | None = None
        # clients.csv / resources.csv rows of the rounds before a resume (load_state_dict)
        self.prior_clients: list[dict[str, Any]] = []
        self.prior_resources: list[dict[str, Any]] = []
        self.clock = None  # a SimulatedClock (measurements/clock.py): its times replace the host's in the tables
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
        self._grid = grid if isinstance(grid, TimingGrid) else TimingGrid(grid, auth=self.auth)
        return self._grid

    def wrap(self, strategy: Strategy) -> TimedStrategy:
        self.strategy = TimedStrategy(strategy, on_round=self._on_round, telemetry=self.telemetry, auth=self.auth)
        self.strategy.grid = self._grid  # the grid of :meth:`grid`, also where another wrapper starts the rounds
        return self.strategy

    # --- checkpoints (server_app/checkpoint.py) ----------------------------------------------
    def state_dict(self) -> dict:
        """clients.csv's and resources.csv's rows so far: what was measured before a crash
        is not measured again."""
        clients, resources = self.rows()
        return {"clients": clients, "resources": resources}

    def load_state_dict(self, state, node) -> None:
        """The rows of the run being resumed, with its nodes' ids in this run
        (``node(old) -> new | None``; a node that did not come back keeps its old id)."""
        self.prior_clients = [renamed_row(r, node) for r in state["clients"]]
        self.prior_resources = [renamed_row(r, node) for r in state["resources"]]

    def take_replies(self, replies) -> None:
        """Events that arrived in replies the strategy never saw (e.g. profile queries)."""
        ingest_replies(replies, self.telemetry)

    def _on_round(self, timing: RoundTiming) -> None:
        if self.clock is not None:  # the fleet's round, not this host's: the server's own part stays measured
            timing.round_s = self.clock.round_s(timing.server_round, server_s=timing.configure_s + timing.aggregation_s,
                                                cut=bool(timing.late))
            timing.clock = "simulated"
        self.run_dir.append_round_timing(timing)
        self.write_tables()

    def write_tables(self) -> None:
        """clients.csv and resources.csv as far as the figures go (uplinks fill in late)."""
        clients, resources = self.rows()
        self.run_dir.write_table("clients.csv", CLIENTS_COLUMNS, clients)
        self.run_dir.write_table("resources.csv", RESOURCES_COLUMNS, resources)

    def rows(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """clients.csv's and resources.csv's rows: those of the run resumed, then this run's."""
        grid = self.strategy.grid if self.strategy is not None else None
        sent = grid.messages() if grid is not None else []
        events = self.telemetry.events()
        clients = client_rows(sent, events, self.profiles, outcomes=self.outcomes())
        if self.clock is not None:
            clients = [self.clock.rewrite(row) for row in clients]
        return self.prior_clients + clients, self.prior_resources + resource_rows(sent, events)

    def outcomes(self) -> dict[tuple[int, int], tuple[str, str]]:
        """(round, node) -> (status, reason): what the strategy did with each reply."""
        timings = self.strategy.timings if self.strategy is not None else {}
        return {(r, n): o for r, t in timings.items() for n, o in t.outcomes.items()}

    def round_times(self, server_round: int) -> dict[int, float]:
        """{node: seconds} of one round's training message, as measured so far: downlink +
        train + uplink where the node measured all three (stamen-supernode), else the
        server's send-to-reply time (e2e_s). Nodes without a reply are left out."""
        if self.clock is not None:
            return self.clock.times(server_round)
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
