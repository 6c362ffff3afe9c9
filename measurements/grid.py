"""The server's view of every message: when it left, when its reply came back.

``TimingGrid(grid)`` stands in for Flower's Grid in ``Strategy.start``. It runs the
wrapped grid's own ``send_and_receive`` (the same loop and the same polling interval, so
timing changes nothing about how a round runs) with itself as ``self``, so that every
push and pull passes through it and is timed on the server clock:

* ``sent_unix_s``: just before the message is pushed to the SuperLink;
* ``received_unix_s``: when the poll that returned its reply came back. The ServerApp
  polls every 3 s (flwr 1.39), so this includes up to one polling interval: that is part
  of what a round costs, and part of ``wait_s``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from flwr.app import ConfigRecord, Message, RecordDict

from stamen import keys


@dataclass
class SentMessage:
    message_id: str
    node_id: int
    message_type: str
    group_id: str  # the round, as Strategy.start labels it
    sent_unix_s: float
    payload_bytes: int  # arrays of the instruction (ArrayRecord bytes)
    received_unix_s: float | None = None
    reply_payload_bytes: int = 0
    error: str = ""
    lora_rank: int | None = None  # what the instruction asked of the node (clients.csv, the latency model)
    prune_ratio: float | None = None

    @property
    def e2e_s(self) -> float | None:
        return None if self.received_unix_s is None else self.received_unix_s - self.sent_unix_s


def asked(msg: Message) -> tuple[int | None, float | None]:
    """The LoRA rank and pruning ratio a train instruction asks for (None: not a LoRA
    instruction); a message without a pruning ratio prunes nothing."""
    if not msg.has_content() or keys.CONFIG not in msg.content.config_records:
        return None, None
    config = msg.content.config_records[keys.CONFIG]
    if keys.LORA_RANK not in config:
        return None, None
    return int(config[keys.LORA_RANK]), float(config.get(keys.PRUNE_RATIO, 0.0))


def payload_bytes(msg: Message) -> int:
    """ArrayRecord bytes a message carries (before serialization and framing)."""
    if not msg.has_content():
        return 0
    return sum(rec.count_bytes() for rec in msg.content.array_records.values())


class TimingGrid:
    """``auth``: every outgoing message carries its node's telemetry key, and the
    ``auth`` learns which message went to which node (measurements/auth.py)."""

    def __init__(self, grid, auth=None) -> None:
        self._grid = grid
        self.auth = auth
        self._lock = threading.Lock()
        self.sent: dict[str, SentMessage] = {}

    def __getattr__(self, name):  # everything not timed goes to the real grid
        return getattr(self._grid, name)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        sizes = [payload_bytes(m) for m in messages]
        if self.auth is not None:
            for m in messages:
                if m.has_content():  # a content of its own: Flower's strategies give every message the same RecordDict
                    content = RecordDict(dict(m.content.items()))
                    content[keys.TELEMETRY_AUTH] = ConfigRecord({keys.TELEMETRY_KEY: self.auth.key_for(m.metadata.dst_node_id)})
                    m.content = content
        t = time.time()
        ids = list(self._grid.push_messages(messages))
        if self.auth is not None:
            for msg, mid in zip(messages, ids, strict=False):
                if mid:
                    self.auth.note_sent(mid, msg.metadata.dst_node_id)
        with self._lock:
            for msg, mid, size in zip(messages, ids, sizes, strict=False):
                if mid:
                    rank, prune = asked(msg)
                    self.sent[mid] = SentMessage(
                        mid, int(msg.metadata.dst_node_id), str(msg.metadata.message_type), str(msg.metadata.group_id), t, size,
                        lora_rank=rank, prune_ratio=prune,
                    )
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self._grid.pull_messages(message_ids))
        t = time.time()
        with self._lock:
            for reply in replies:
                entry = self.sent.get(reply.metadata.reply_to_message_id)
                if entry is not None and entry.received_unix_s is None:
                    entry.received_unix_s = t
                    entry.reply_payload_bytes = payload_bytes(reply)
                    entry.error = reply.error.reason if reply.has_error() else ""
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return type(self._grid).send_and_receive(self, messages, timeout=timeout)

    def messages(self, message_type: str | None = None) -> list[SentMessage]:
        with self._lock:
            return [m for m in self.sent.values() if message_type is None or m.message_type == message_type]
