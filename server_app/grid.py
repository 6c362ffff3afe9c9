"""The ServerApp's grid with a settable reply poll (``strategy.poll-interval``).

flwr 1.39's ``Grid.send_and_receive`` pushes the messages, then pulls replies every 3 s
until all are in or the timeout passes: a reply that arrives just after a pull waits up
to 3 s, in every round and in the device-profile query. ``PolledGrid`` runs the same loop
with the configured interval (3 s gives Flower's behaviour) and passes everything else to
the wrapped grid. Written by hand: the interval is a literal in Flower's loop.

A reply the SuperLink writes itself, because the node is gone or the message expired
(flwr's ``NODE_UNAVAILABLE`` / ``REPLY_MESSAGE_UNAVAILABLE``), names the SuperLink as its
sender. ``PolledGrid`` gives it the node it is about (:func:`attribute_superlink_errors`),
so the strategies drop that node, not "node 1", and count one drop, not two.

``fast_object_retries`` does for the ServerApp's pulls what ``device_runtime/supernode.py``
does for the SuperNode's: flwr's ``pull_objects`` retries an object the SuperLink does not
have yet after 1 s, doubling, and the SuperLink offers a reply before the node has pushed
all of its objects. A short grid poll meets that often; the retry becomes 20 ms, doubling
up to 200 ms, when the poll is shorter than Flower's 3 s.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable

from flwr.app import Message, Metadata
from flwr.app.message import make_message
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.inflatable.inflatable_utils import pull_objects as flower_pull_objects
from flwr.superlink.grid import http_grid

FLOWER_POLL_S = 3.0
OBJECT_RETRY_S, OBJECT_RETRY_CAP_S = 0.02, 0.2


def fast_object_retries() -> None:
    """Short retries for the objects of replies the ServerApp pulls (see the module doc)."""
    http_grid.pull_objects = functools.partial(
        flower_pull_objects, initial_backoff=OBJECT_RETRY_S, backoff_cap=OBJECT_RETRY_CAP_S, max_tries_per_object=None
    )


def attribute_superlink_errors(replies: Iterable[Message], sent: dict[str, int]) -> list[Message]:
    """``replies`` with each error reply from the SuperLink re-addressed as coming from the
    node its instruction went to (``sent``: instruction id -> node); the error is kept."""
    out = []
    for msg in replies:
        meta = msg.metadata
        node = sent.get(meta.reply_to_message_id)
        if meta.src_node_id == SUPERLINK_NODE_ID and msg.has_error() and node is not None:
            fields = {name: getattr(meta, name) for name in (
                "run_id", "message_id", "dst_node_id", "reply_to_message_id", "group_id", "created_at", "ttl",
                "message_type", "src_task_id", "dst_task_id")}
            msg = make_message(Metadata(**fields, src_node_id=node), error=msg.error)
        out.append(msg)
    return out


class PolledGrid:
    def __init__(self, grid, poll_s: float) -> None:
        if not poll_s > 0:
            raise ValueError(f"poll_s must be > 0, got {poll_s}")
        self._grid = grid
        self.poll_s = poll_s
        if poll_s < FLOWER_POLL_S:
            fast_object_retries()

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Flower's loop, polling every ``poll_s``; ``self`` may be a wrapper around this
        grid (measurements/grid.py's TimingGrid runs it with itself as ``self``)."""
        messages = list(messages)
        ids = list(self.push_messages(messages))
        sent = {mid: int(m.metadata.dst_node_id) for mid, m in zip(ids, messages, strict=True) if mid}
        pending = set(sent)
        end = time.time() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        while timeout is None or time.time() < end:
            got = attribute_superlink_errors(self.pull_messages(pending), sent)
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending:
                break
            time.sleep(self.poll_s)
        return replies
