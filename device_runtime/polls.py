"""The device's polls and its transfer concurrency: what they are, their defaults, and
their bounds. Light on purpose (no Flower import): ``stamen``'s command line reads it for
its flags."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

# flwr 1.39's: the SuperNode's idle and reply sleeps (device_runtime/supernode.py) and
# SuperExec's task poll
FLOWER_IDLE_POLL_S = 3.0
FLOWER_REPLY_POLL_S = 0.5
FLOWER_TASK_POLL_S = 1.0


@dataclass(frozen=True)
class NodePolls:
    """Seconds between two polls: the SuperLink when idle, the ClientApp's reply, the tasks."""

    idle: float
    reply: float
    task: float

    def __post_init__(self) -> None:
        for name in ("idle", "reply", "task"):
            if not in_bounds(getattr(self, name)):
                raise ValueError(f"the {name} poll must be between {LOW} and {HIGH} seconds, got {getattr(self, name)}")


LOW, HIGH = 0.001, 60.0


def in_bounds(seconds: float) -> bool:
    return LOW <= seconds <= HIGH


def poll_seconds(text: str) -> float:
    """An argparse type for a poll: seconds in [LOW, HIGH]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not in_bounds(value):
        raise argparse.ArgumentTypeError(f"must be between {LOW} and {HIGH} seconds, got {text}")
    return value


FLOWER_POLLS = NodePolls(FLOWER_IDLE_POLL_S, FLOWER_REPLY_POLL_S, FLOWER_TASK_POLL_S)
WARM_POLLS = NodePolls(idle=0.5, reply=0.05, task=0.05)  # chosen in docs/runtime.md ("Polls")

MAX_CONCURRENCY = 64
# Object RPCs in flight per transfer under the warm runtime: on the 5g profile (47 ms RTT)
# 2 (Flower's) -> 8 took a 3.7 MB packed uplink from 2.47 to 2.25 s and 16 gained nothing
# more (docs/transfers.md, bench/transfer_goodput.py). --no-warm keeps Flower's.
WARM_TRANSFER_CONCURRENCY = 8


def transfer_concurrency(text: str) -> int:
    """An argparse type for ``--transfer-concurrency``: object RPCs in flight, 1..64."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if not 1 <= value <= MAX_CONCURRENCY:
        raise argparse.ArgumentTypeError(f"must be in 1..{MAX_CONCURRENCY}, got {value}")
    return value
