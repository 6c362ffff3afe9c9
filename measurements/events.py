"""One measurement taken on a node: the unit that the spool stores, the telemetry service
streams, and a reply carries when the service is unreachable.

An event's clock is the node's: ``start_unix_s`` is its wall clock (comparable with the
server's only through a clock-offset estimate), ``duration_s`` its monotonic clock.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields

# kinds
DOWNLINK = "downlink"  # the SuperNode's pull RPCs of one instruction (measurements/transport.py)
UPLINK = "uplink"  # the SuperNode's push RPCs of one reply
SAMPLE = "sample"  # one resource sample (measurements/resources.py)
CLOCK = "clock"  # a clock-offset estimate (measurements/telemetry.py)
# and the message type of a handled message: the ClientApp mod's phase timings of that
# handler (measurements/client_mod.py), for these types:
HANDLERS = ("train", "evaluate")
SAMPLE_VALUES = ("rss_bytes", "cpu_pct", "system_cpu_pct", "temp_c", "gpu_mem_bytes")  # of a SAMPLE event


@dataclass
class Event:
    kind: str
    start_unix_s: float
    duration_s: float = 0.0
    node_id: int = 0
    run_id: int = 0
    message_id: str = ""
    values: dict[str, float] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    seq: int = 0  # set by the spool
    spool_id: str = ""
    mac: str = ""  # HMAC of the other fields with the node's key, when streamed (measurements/auth.py)

    @property
    def end_unix_s(self) -> float:
        return self.start_unix_s + self.duration_s

    @property
    def key(self) -> tuple[int, str, int]:
        """Identifies an event across delivery paths (a path may deliver it twice). The
        node is part of it: another node cannot take an event's place by reusing its
        spool id and sequence number."""
        return (self.node_id, self.spool_id, self.seq)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Event:
        return cls(
            kind=str(data["kind"]),
            start_unix_s=float(data["start_unix_s"]),
            duration_s=float(data.get("duration_s", 0.0)),
            node_id=int(data.get("node_id", 0)),
            run_id=int(data.get("run_id", 0)),
            message_id=str(data.get("message_id", "")),
            values={str(k): float(v) for k, v in dict(data.get("values", {})).items()},
            labels={str(k): str(v) for k, v in dict(data.get("labels", {})).items()},
            seq=int(data.get("seq", 0)),
            spool_id=str(data.get("spool_id", "")),
            mac=str(data.get("mac", "")),
        )

    def to_proto(self):
        from stamen_telemetry import telemetry_pb2

        return telemetry_pb2.Event(**self.to_json())  # the proto's fields are this class's fields

    @classmethod
    def from_proto(cls, msg) -> Event:
        return cls.from_json({f.name: getattr(msg, f.name) for f in fields(cls)})


def best_clocks(events: Iterable[Event]) -> dict[int, Event]:
    """node id -> its ``clock`` event with the smallest round trip (NTP's min-delay filter)."""
    best: dict[int, Event] = {}
    for e in events:
        if e.kind == CLOCK and (e.node_id not in best or e.values.get("rtt_s", 1e9) < best[e.node_id].values.get("rtt_s", 1e9)):
            best[e.node_id] = e
    return best


def dumps(events: list[Event]) -> str:
    return json.dumps([e.to_json() for e in events], separators=(",", ":"))


def loads(text: str) -> list[Event]:
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError("telemetry events must be a JSON list")
    return [Event.from_json(d) for d in data]
