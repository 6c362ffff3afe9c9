"""One measurement taken on a node: the unit that the spool stores, the telemetry service
streams, and a reply carries when the service is unreachable.

An event's clock is the node's: ``start_unix_s`` is its wall clock (comparable with the
server's only through a clock-offset estimate), ``duration_s`` its monotonic clock.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

# kinds
DOWNLINK = "downlink"  # the SuperNode's pull RPCs of one instruction (measurements/transport.py)
UPLINK = "uplink"  # the SuperNode's push RPCs of one reply
SAMPLE = "sample"  # one resource sample (measurements/resources.py)
CLOCK = "clock"  # a clock-offset estimate (measurements/telemetry.py)
# and the message type of a handled message ("train", "evaluate", "query"): the ClientApp
# mod's phase timings of that handler (measurements/client_mod.py)


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

    @property
    def end_unix_s(self) -> float:
        return self.start_unix_s + self.duration_s

    @property
    def key(self) -> tuple[str, int]:
        """Identifies an event across delivery paths (a path may deliver it twice)."""
        return (self.spool_id, self.seq)

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
        )

    def to_proto(self):
        from stamen_telemetry import telemetry_pb2

        return telemetry_pb2.Event(
            seq=self.seq,
            spool_id=self.spool_id,
            node_id=self.node_id,
            run_id=self.run_id,
            message_id=self.message_id,
            kind=self.kind,
            start_unix_s=self.start_unix_s,
            duration_s=self.duration_s,
            values=self.values,
            labels=self.labels,
        )

    @classmethod
    def from_proto(cls, msg) -> Event:
        return cls(
            kind=msg.kind,
            start_unix_s=msg.start_unix_s,
            duration_s=msg.duration_s,
            node_id=msg.node_id,
            run_id=msg.run_id,
            message_id=msg.message_id,
            values=dict(msg.values),
            labels=dict(msg.labels),
            seq=msg.seq,
            spool_id=msg.spool_id,
        )


def dumps(events: list[Event]) -> str:
    return json.dumps([e.to_json() for e in events], separators=(",", ":"))


def loads(text: str) -> list[Event]:
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError("telemetry events must be a JSON list")
    return [Event.from_json(d) for d in data]
