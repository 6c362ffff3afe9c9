"""The ServerApp's grid with a settable reply poll (``strategy.poll-interval``).

flwr 1.39's ``Grid.send_and_receive`` pushes the messages, then pulls replies every 3 s
until all are in or the timeout passes: a reply that arrives just after a pull waits up
to 3 s, in every round and in the device-profile query. ``PolledGrid`` runs the same loop
with the configured interval (3 s gives Flower's behaviour) and passes everything else to
the wrapped grid. Written by hand: the interval is a literal in Flower's loop.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message


class PolledGrid:
    def __init__(self, grid, poll_s: float) -> None:
        if not poll_s > 0:
            raise ValueError(f"poll_s must be > 0, got {poll_s}")
        self._grid = grid
        self.poll_s = poll_s

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Flower's loop, polling every ``poll_s``; ``self`` may be a wrapper around this
        grid (measurements/grid.py's TimingGrid runs it with itself as ``self``)."""
        pending = set(self.push_messages(messages))
        end = time.time() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        while timeout is None or time.time() < end:
            got = list(self.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending:
                break
            time.sleep(self.poll_s)
        return replies
