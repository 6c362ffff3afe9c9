"""Transfer times on the device: a gRPC client interceptor on the SuperNode's Fleet channel.

In flwr 1.39 a SuperNode moves one message at a time, in this order:

  downlink  PullMessages (returns the instruction and its object tree)
            [GetRun, GetFab: the first message of a run only]
            PullObject x n (possibly concurrent)
            ConfirmMessageReceived
  ...       the ClientApp runs
  uplink    PushMessages (the reply's metadata and object tree)
            PushObject x m (possibly concurrent)

``TransferTracker`` follows that sequence and turns it into one ``downlink`` and one
``uplink`` event per message: the span from the first RPC's start to the last one's end
on the device's monotonic clock, less the GetRun/GetFab time (reported apart as
``setup_s``), and the serialized protobuf bytes of requests and responses (``bytes``:
what crossed the wire above HTTP/2 and TLS framing). Empty PullMessages (Flower's
polling) and heartbeats are not transfers and are left out.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from . import events as ev

log = logging.getLogger("stamen.transport")
_DOWN = ("PullMessages", "GetRun", "GetFab", "PullObject", "ConfirmMessageReceived")
_SETUP = ("GetRun", "GetFab")
_UP = ("PushMessages", "PushObject")


@dataclass
class _Transfer:
    kind: str
    message_id: str
    run_id: int
    round_label: str
    start_unix_s: float
    start_perf: float
    end_perf: float = 0.0
    setup_s: float = 0.0
    bytes_sent: int = 0  # request bytes
    bytes_received: int = 0  # response bytes
    rpcs: int = 0
    failed_rpcs: int = 0
    retries: int = 0  # PullObject answered "not there yet" (the SuperLink offers a message before it has all its objects)
    open_calls: int = 0
    notes: list[str] = field(default_factory=list)


class TransferTracker:
    """Groups timed Fleet RPCs into transfers and hands each finished one to ``emit``."""

    def __init__(self, emit: Callable[[ev.Event], None]) -> None:
        self.emit = emit
        self.node_id = 0
        self._lock = threading.Lock()
        self._down: _Transfer | None = None
        self._up: _Transfer | None = None

    def on_rpc(self, method: str, request, response, start_unix: float, start_perf: float, end_perf: float, ok: bool) -> None:
        finished: list[_Transfer] = []
        with self._lock:
            if method == "ActivateNode" and ok:
                self.node_id = int(response.node_id)
            elif method == "PullMessages":
                if self._up is not None:  # the loop is back to polling: the uplink is complete
                    finished.append(self._up)
                    self._up = None
                if ok and len(response.messages_list) > 0:
                    meta = response.messages_list[0].metadata
                    if self._down is not None:  # an earlier downlink never confirmed
                        self._down.notes.append("unconfirmed")
                        finished.append(self._down)
                    self._down = _Transfer("downlink", meta.message_id, meta.run_id, meta.group_id, start_unix, start_perf)
                    self._add(self._down, request, response, start_perf, end_perf, ok)
            elif method in _DOWN and self._down is not None:
                self._add(self._down, request, response, start_perf, end_perf, ok)
                if method == "PullObject" and ok and not response.object_available:
                    self._down.retries += 1
                if method in _SETUP:
                    self._down.setup_s += end_perf - start_perf
                if method == "ConfirmMessageReceived":
                    finished.append(self._down)
                    self._down = None
            elif method == "PushMessages":
                if self._up is not None:
                    finished.append(self._up)
                meta = request.messages_list[0].metadata if len(request.messages_list) else None
                self._up = _Transfer(
                    "uplink",
                    meta.reply_to_message_id if meta else "",
                    meta.run_id if meta else 0,
                    meta.group_id if meta else "",
                    start_unix,
                    start_perf,
                )
                self._add(self._up, request, response, start_perf, end_perf, ok)
            elif method == "PushObject" and self._up is not None:
                self._add(self._up, request, response, start_perf, end_perf, ok)
        for transfer in finished:
            self._emit(transfer)

    def flush(self) -> None:
        """Emit what is still open (the SuperNode is stopping)."""
        with self._lock:
            pending = [t for t in (self._down, self._up) if t is not None]
            self._down = self._up = None
        for transfer in pending:
            self._emit(transfer)

    @staticmethod
    def _add(t: _Transfer, request, response, start_perf: float, end_perf: float, ok: bool) -> None:
        t.rpcs += 1
        t.failed_rpcs += 0 if ok else 1
        t.start_perf = min(t.start_perf, start_perf)
        t.end_perf = max(t.end_perf, end_perf)
        t.bytes_sent += request.ByteSize()
        if ok and response is not None:
            t.bytes_received += response.ByteSize()

    def _emit(self, t: _Transfer) -> None:
        duration = max(0.0, t.end_perf - t.start_perf - t.setup_s)
        values = {
            "bytes": float(t.bytes_received if t.kind == "downlink" else t.bytes_sent),
            "bytes_sent": float(t.bytes_sent),
            "bytes_received": float(t.bytes_received),
            "rpcs": float(t.rpcs),
            "failed_rpcs": float(t.failed_rpcs),
            "retries": float(t.retries),
            "setup_s": t.setup_s,
        }
        labels = {"round": t.round_label, "transport": "stamen-supernode"}
        if t.notes:
            labels["notes"] = ",".join(t.notes)
        event = ev.Event(
            t.kind, t.start_unix_s, duration, node_id=self.node_id, run_id=t.run_id, message_id=t.message_id, values=values, labels=labels
        )
        try:
            self.emit(event)
        except Exception as err:  # a measurement must never break the SuperNode
            log.warning("could not record a %s transfer: %s", t.kind, err)


class FleetTimingInterceptor(grpc.UnaryUnaryClientInterceptor):
    """Times every unary Fleet RPC and hands it to a ``TransferTracker``."""

    def __init__(self, tracker: TransferTracker) -> None:
        self.tracker = tracker

    def intercept_unary_unary(self, continuation, client_call_details, request):
        method = str(client_call_details.method).rsplit("/", 1)[-1]
        if method not in _DOWN and method not in _UP and method != "ActivateNode":
            return continuation(client_call_details, request)  # heartbeats, registration
        start_unix, start_perf = time.time(), time.perf_counter()
        outcome = continuation(client_call_details, request)
        try:
            response, ok = outcome.result(), True  # blocking calls are complete already
        except grpc.RpcError:
            response, ok = None, False
        end_perf = time.perf_counter()
        try:
            self.tracker.on_rpc(method, request, response, start_unix, start_perf, end_perf, ok)
        except Exception as err:  # pragma: no cover - a measurement must never break the SuperNode
            log.warning("transfer timing failed for %s: %s", method, err)
        return outcome


def install(tracker: TransferTracker) -> None:
    """Add the interceptor to the channel flwr's SuperNode opens to the SuperLink.

    flwr 1.39 builds that channel in ``flwr.client.grpc_rere_client.connection`` with
    ``create_channel(..., interceptors=[...])`` and offers no hook for more interceptors,
    so this wraps that module's ``create_channel``: ours goes last, next to the wire.
    """
    from flwr.client.grpc_rere_client import connection

    original = connection.create_channel
    if getattr(original, "_stamen_wrapped", False):
        return

    def create_channel(*args, interceptors=None, **kwargs):
        return original(*args, interceptors=[*(interceptors or []), FleetTimingInterceptor(tracker)], **kwargs)

    create_channel._stamen_wrapped = True  # type: ignore[attr-defined]
    connection.create_channel = create_channel
