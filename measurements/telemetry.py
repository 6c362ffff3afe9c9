"""Stamen's telemetry service (proto/stamen_telemetry/telemetry.proto), both ends.

* ``TelemetryCollector`` runs inside the ServerApp: a small gRPC server that stores the
  events nodes stream to it (``TelemetryStore``) and answers clock probes.
* ``TelemetrySender`` runs inside ``stamen-supernode``: a thread that streams the node's
  spool to the collector every ``interval`` seconds and estimates the clock offset.

If the collector cannot be reached the sender gives its claims back to the spool; the
ClientApp mod then puts those events into the next reply (``measurements/client_mod.py``).
The store remembers which path delivered each event.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterable
from concurrent import futures
from dataclasses import dataclass

import grpc

from . import auth
from . import events as ev
from .auth import budget
from .spool import SENDING, TELEMETRY, Spool

log = logging.getLogger("stamen.telemetry")
DEFAULT_PORT = 9400
VIA_TELEMETRY = "telemetry"
VIA_REPLY = "reply"


# -- clock offset (pure) --------------------------------------------------------------


@dataclass(frozen=True)
class ClockProbe:
    node_send: float  # t0, node clock
    server_receive: float  # t1, server clock
    server_send: float  # t2, server clock
    node_receive: float  # t3, node clock

    @property
    def offset_s(self) -> float:
        """server clock - node clock, assuming symmetric paths (NTP)."""
        return ((self.server_receive - self.node_send) + (self.server_send - self.node_receive)) / 2.0

    @property
    def rtt_s(self) -> float:
        return (self.node_receive - self.node_send) - (self.server_send - self.server_receive)


def best_probe(probes: Iterable[ClockProbe]) -> ClockProbe:
    """NTP's minimum-delay filter: the probe with the smallest round trip has the
    smallest possible asymmetry error (at most rtt/2)."""
    probes = list(probes)
    if not probes:
        raise ValueError("no clock probes")
    return min(probes, key=lambda p: p.rtt_s)


# -- server side ----------------------------------------------------------------------


class TelemetryStore:
    """Events of one run from all nodes, deduplicated across delivery paths.

    With an ``auth`` (measurements/auth.py) an event is kept only if it is genuine: signed
    by a node of this run for itself when it came over the telemetry service, or about
    the node that sent the reply it came in, and about a message the server sent that
    node. Either way at most a budget of events is kept per node, message and kind
    (measurements/auth.py: ``budget``): a flood costs bounded memory. Refusals are
    counted in :attr:`refused` and logged once per node and reason."""

    def __init__(self, run_id: int | None = None, *, auth=None) -> None:
        self.run_id = run_id
        self.auth = auth
        self._lock = threading.Lock()
        self._events: dict[tuple, ev.Event] = {}
        self._via: dict[tuple, str] = {}
        self._count: Counter = Counter()  # (node, message id, kind) -> events kept
        self.refused: Counter = Counter()  # (node, reason) -> events refused

    def add(self, events: Iterable[ev.Event], via: str, *, sender: int | None = None) -> list[int]:
        """Keep the genuine ones among ``events``; returns every sequence number read (the
        sender need not deliver any of them again, kept or not). ``sender``: the node
        whose reply carried them (None: the telemetry service)."""
        stored = []
        with self._lock:
            for event in events:
                stored.append(event.seq)
                if sender is not None:
                    event.node_id = event.node_id or sender
                    event.run_id = event.run_id or (self.run_id or 0)
                    if event.node_id != sender:  # a reply speaks for the node that sent it only
                        self._refuse(sender, f"events of node {event.node_id} in its reply")
                        continue
                if self.run_id is not None and event.run_id != self.run_id and self.auth is None:
                    continue  # a leftover of another run: accepted, not kept
                if event.key in self._events:  # delivered before, by the other path
                    continue
                reason = self.auth.check(event, sender=sender) if self.auth is not None else None
                bucket, limit = budget(event)
                if reason is None and self._count[bucket] >= limit:
                    reason = f"over the budget of {limit} {bucket[2]} events per node and message"
                if reason is not None:
                    self._refuse(event.node_id, reason, event)
                    continue
                self._events[event.key] = event
                self._via[event.key] = via
                self._count[bucket] += 1
        return stored

    def _refuse(self, node_id: int, reason: str, event: ev.Event | None = None) -> None:
        if not self.refused[(node_id, reason)]:
            what = f" (the first: {event.kind}, message {event.message_id[:12] or '-'})" if event is not None else ""
            log.warning("telemetry: refusing events from node %s: %s%s", node_id, reason, what)
        self.refused[(node_id, reason)] += 1

    def events(self, kind: str | None = None) -> list[tuple[ev.Event, str]]:
        with self._lock:
            return [(e, self._via[k]) for k, e in self._events.items() if kind is None or e.kind == kind]

    def clock(self) -> dict[int, ev.Event]:
        """node id -> its clock estimate with the smallest round trip."""
        return ev.best_clocks(e for e, _ in self.events(ev.CLOCK))


class _Servicer:
    def __init__(self, store: TelemetryStore) -> None:
        self.store = store

    def Report(self, request_iterator, context):  # noqa: N802 (gRPC method name)
        from stamen_telemetry import telemetry_pb2

        stored = self.store.add((ev.Event.from_proto(m) for m in request_iterator), VIA_TELEMETRY)
        return telemetry_pb2.ReportAck(stored_seqs=stored)

    def Sync(self, request, context):  # noqa: N802
        from stamen_telemetry import telemetry_pb2

        received = time.time()
        return telemetry_pb2.SyncReply(
            node_send_unix_s=request.node_send_unix_s, server_receive_unix_s=received, server_send_unix_s=time.time()
        )


class TelemetryCollector:
    """``with TelemetryCollector("0.0.0.0:9400", store) as c: ...``; ``c.port`` is the
    bound port (0 asks for a free one) and None when binding failed: the run goes on and
    the nodes' events come in replies instead."""

    def __init__(self, address: str, store: TelemetryStore, *, certfile: str = "", keyfile: str = "") -> None:
        """``certfile`` / ``keyfile``: serve TLS with that certificate (the SuperLink's)."""
        if bool(certfile) != bool(keyfile):
            raise ValueError("the telemetry collector's TLS needs both measure.collector-certfile and measure.collector-keyfile")
        self.address, self.store = address, store
        self.certfile, self.keyfile = certfile, keyfile
        self.port: int | None = None
        self._server: grpc.Server | None = None

    def __enter__(self) -> TelemetryCollector:
        from stamen_telemetry import telemetry_pb2_grpc

        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="stamen-collector"))
        telemetry_pb2_grpc.add_TelemetryServicer_to_server(_Servicer(self.store), server)
        try:
            if self.certfile:
                with open(self.keyfile, "rb") as key, open(self.certfile, "rb") as cert:
                    credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
                port = server.add_secure_port(self.address, credentials)
            else:
                port = server.add_insecure_port(self.address)
        except RuntimeError as err:
            port = 0
            log.warning("telemetry collector: cannot bind %s (%s)", self.address, err)
        if port == 0:
            log.warning("telemetry collector not running on %s: node events will come in replies", self.address)
            return self
        server.start()
        self._server, self.port = server, port
        return self

    def __exit__(self, *exc) -> None:
        if self._server is not None:
            self._server.stop(grace=1.0).wait()
            self._server = None


# -- node side ------------------------------------------------------------------------


class TelemetrySender:
    """Streams a spool to the collector from a daemon thread (inside stamen-supernode)."""

    def __init__(
        self,
        spool: Spool,
        address: str,
        *,
        node_id=lambda: 0,
        interval: float = 1.0,
        probes: int = 8,
        resync_s: float = 60.0,
        root_certificates: bytes | None = None,
    ) -> None:
        self.spool, self.address, self.node_id = spool, address, node_id
        self.interval, self.probes, self.resync_s = interval, probes, resync_s
        self.root_certificates = root_certificates
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._channel: grpc.Channel | None = None
        self._stub = None
        self._last_sync = float("-inf")
        self._reachable = None  # unknown until the first attempt

    def start(self) -> TelemetrySender:
        from stamen_telemetry import telemetry_pb2_grpc

        self.spool.recover()
        if self.root_certificates is not None:
            self._channel = grpc.secure_channel(self.address, grpc.ssl_channel_credentials(self.root_certificates))
        else:
            self._channel = grpc.insecure_channel(self.address)
        self._stub = telemetry_pb2_grpc.TelemetryStub(self._channel)
        self._thread = threading.Thread(target=self._run, name="stamen-telemetry-sender", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.send_once()  # what the last interval left
        if self._channel is not None:
            self._channel.close()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.send_once()

    def send_once(self) -> int:
        """One attempt: maybe a clock sync, then stream what the spool holds. Returns how
        many events the collector stored."""
        if self._stub is None:
            return 0
        now = time.monotonic()
        if now - self._last_sync >= self.resync_s:
            if self.sync_clock():
                self._last_sync = now
        events = self.claim_signed()
        if not events:
            return 0
        try:
            ack = self._stub.Report(iter([e.to_proto() for e in events]), timeout=10.0)
        except grpc.RpcError as err:
            self.spool.release([e.seq for e in events])
            self._note_reachable(False, err)
            return 0
        stored = set(ack.stored_seqs)
        self.spool.mark([e.seq for e in events if e.seq in stored], TELEMETRY)
        self.spool.release([e.seq for e in events if e.seq not in stored])
        self._note_reachable(True)
        return len(stored)

    def claim_signed(self, limit: int = 1000) -> list[ev.Event]:
        """Claim the events of the runs this node holds a telemetry key for, each signed
        with its run's key; events about no run (clock probes) go with the newest run.
        Events of a run without a key stay in the spool: they travel in a reply."""
        run_keys = self.spool.run_keys()
        if not run_keys:
            return []
        node, newest = self.node_id(), list(run_keys)[-1]
        events = []
        for run_id in (*run_keys, 0):
            for e in self.spool.claim(SENDING, run_id=run_id, limit=limit - len(events)):
                e.node_id = e.node_id or node
                e.run_id = e.run_id or newest
                auth.sign(e, run_keys[e.run_id])
                events.append(e)
        return events

    def sync_clock(self) -> bool:
        """Probe the collector's clock and spool a ``clock`` event (min-RTT filter)."""
        from stamen_telemetry import telemetry_pb2

        probes = []
        for _ in range(self.probes):
            t0 = time.time()
            try:
                reply = self._stub.Sync(telemetry_pb2.SyncRequest(node_send_unix_s=t0), timeout=2.0)
            except grpc.RpcError as err:
                self._note_reachable(False, err)
                return False
            t3 = time.time()
            probes.append(ClockProbe(t0, reply.server_receive_unix_s, reply.server_send_unix_s, t3))
        best = best_probe(probes)
        self.spool.add(
            ev.Event(
                ev.CLOCK,
                best.node_send,
                best.node_receive - best.node_send,
                node_id=self.node_id(),
                values={"offset_s": best.offset_s, "rtt_s": best.rtt_s, "probes": float(len(probes))},
            )
        )
        return True

    def _note_reachable(self, reachable: bool, err: Exception | None = None) -> None:
        if reachable != self._reachable:
            if reachable:
                log.info("telemetry: streaming to %s", self.address)
            else:
                code = err.code().name if isinstance(err, grpc.RpcError) else err
                log.info("telemetry: collector %s unreachable (%s); events go in replies", self.address, code)
        self._reachable = reachable

