"""Authenticated telemetry: the collector keeps only events a node of this run signed for
itself, about a message the server sent it, within a budget per node and message.

The scheme (docs/measurements.md, "Who can report what"):

1. The ServerApp draws a secret for the run (``secrets.token_bytes``) and derives one key
   per node, ``K_n = HMAC-SHA256(secret, "stamen-telemetry|<run id>|<node id>")``.
2. Every message it sends a node carries that node's key (``TimingGrid`` with an
   ``auth``, measurements/grid.py: the ``stamen.telemetry-auth`` ConfigRecord). It travels over the Fleet API, under TLS when
   TLS is on, so only the node and the server know it; one node's key says nothing about
   another's.
3. The ClientApp mod stores the key in the node's spool; ``stamen-supernode``'s sender
   signs each event it streams: ``mac = HMAC-SHA256(K_n, canonical(event))``
   (:func:`canonical`: the event's fields but the mac, as sorted JSON).
4. The collector (:meth:`TelemetryAuth.check`) recomputes ``K_n`` from the event's own
   node id and checks the mac, that the run is this run, and that an event about a
   message names a message the server sent to that node. Events that arrive in replies
   are authenticated by the Fleet API: they count for the node that sent the reply.
5. Per node, message and kind (:func:`budget`) at most :data:`SAMPLE_BUDGET` resource
   samples or clock probes and :data:`EVENT_BUDGET` events of any other kind are kept,
   so a flood costs bounded memory and a long round keeps its samples and its train event.

Written by hand: Flower authenticates SuperNodes to the SuperLink, not a side channel
such as this one, and gRPC's TLS authenticates the server, not which node is speaking.
HMAC with a key per node and run is the standard construction for that.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading

from . import events as ev

# What the collector keeps per node, message and kind (an unknown kind counts as one, "other"):
SAMPLE_BUDGET = 4096  # resource samples (34 minutes of a handler at 0.5 s) or clock probes (68 hours at one a minute)
EVENT_BUDGET = 8  # any other kind: a message makes one train, one downlink and one uplink event
KINDS = (*ev.HANDLERS, ev.DOWNLINK, ev.UPLINK, ev.SAMPLE, ev.CLOCK)


def budget(event: ev.Event) -> tuple[tuple, int]:
    """The bucket an event counts against, and how many events it holds."""
    kind = event.kind if event.kind in KINDS else "other"
    return (event.node_id, event.message_id, kind), (SAMPLE_BUDGET if kind in (ev.SAMPLE, ev.CLOCK) else EVENT_BUDGET)


def node_key(secret: bytes, run_id: int, node_id: int) -> str:
    """Node ``node_id``'s key in run ``run_id`` (hex)."""
    return hmac.new(secret, f"stamen-telemetry|{int(run_id)}|{int(node_id)}".encode(), hashlib.sha256).hexdigest()


def canonical(event: ev.Event) -> bytes:
    """The bytes an event's mac covers: every field but the mac, as sorted JSON, with each
    field in the type the proto carries (a value of 1100 arrives as 1100.0)."""
    fields = ev.Event.from_json(event.to_json()).to_json()
    fields.pop("mac", None)
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def sign(event: ev.Event, key: str) -> None:
    event.mac = hmac.new(bytes.fromhex(key), canonical(event), hashlib.sha256).hexdigest()


def verify(event: ev.Event, key: str) -> bool:
    expected = hmac.new(bytes.fromhex(key), canonical(event), hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, str(event.mac))


class TelemetryAuth:
    """The run's side of the scheme: issues keys, remembers which message went to which
    node, and says why an event is refused (None: it is genuine)."""

    def __init__(self, run_id: int, secret: bytes | None = None) -> None:
        self.run_id = int(run_id)
        self._secret = secret if secret is not None else secrets.token_bytes(32)
        self._lock = threading.Lock()
        self.issued: set[int] = set()
        self.owner: dict[str, int] = {}  # message id -> the node it was sent to

    def key_for(self, node_id: int) -> str:
        with self._lock:
            self.issued.add(int(node_id))
        return node_key(self._secret, self.run_id, node_id)

    def note_sent(self, message_id: str, node_id: int) -> None:
        with self._lock:
            self.owner[str(message_id)] = int(node_id)

    def check(self, event: ev.Event, *, sender: int | None = None) -> str | None:
        """Why ``event`` is refused, or None. ``sender``: the node a reply came from (the
        Fleet API vouches for it; no mac needed); None: it came over the telemetry service."""
        if event.run_id != self.run_id:
            return f"run {event.run_id}, not this run"
        with self._lock:
            issued, owner = event.node_id in self.issued, self.owner.get(event.message_id)
        if sender is not None:
            if event.node_id != sender:
                return f"node {event.node_id} in a reply from node {sender}"
        elif not issued:
            return f"node {event.node_id} was given no key in this run"
        elif not event.mac or not verify(event, node_key(self._secret, self.run_id, event.node_id)):
            return "its signature does not verify"
        if event.message_id and owner != event.node_id:
            return f"message {event.message_id[:12]} was not sent to node {event.node_id}"
        return None
