"""A round that too few nodes served fails the run, loudly.

Flower's ``Strategy.start`` carries on when every reply of a round is an error: the round
aggregates nothing, the model stays as it was, and the run still ends
``finished:completed``. At fleet scale that hides a broken setup (a partition that
cannot be built, a model path missing on the devices) behind a run that looks fine.

``Quorum(strategy, min_replies=k)`` wraps any strategy (by composition, like Flower's DP
wrappers): after the wrapped ``aggregate_train`` has booked the round (its drops and
clients.csv rows are written), a round whose messages got fewer than ``k`` replies
without an error raises :class:`RoundFailedError`. The message names the nodes and their
errors, grouped, so one line says what broke on 1,000 nodes. The ServerApp lets it
propagate: Flower marks the run ``finished:failed`` and ``stamen`` exits non-zero.

A reply the server refuses (out of bounds, invalid, a spent privacy budget) is a reply:
the node worked and the server's checks did their job. Counting those as failures would
let one bad node stop the run for everyone. A round with no participants (every node
retired, say) sends nothing and is not judged here.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp.strategy import Strategy

from stamen.wrapping import StrategyWrapper


class RoundFailedError(RuntimeError):
    """Too few nodes served a round; the message names them and what they said."""


def failure_summary(errors: dict[int, str], *, silent: Iterable[int] = (), shown: int = 3) -> str:
    """``errors`` (node -> reason) and ``silent`` nodes, grouped by reason: '37 nodes
    (1, 2, 3, ...): <reason>'; the most frequent reason first."""
    by_reason: dict[str, list[int]] = defaultdict(list)
    for node, reason in errors.items():
        by_reason[reason].append(node)
    silent = sorted(silent)
    if silent:
        by_reason["no reply before the round timeout"].extend(silent)
    parts = []
    for reason, nodes in sorted(by_reason.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        nodes = sorted(nodes)
        named = ", ".join(str(n) for n in nodes[:shown]) + (", ..." if len(nodes) > shown else "")
        parts.append(f"{len(nodes)} node{'s' if len(nodes) != 1 else ''} ({named}): {reason}")
    return "; ".join(parts)


def check_quorum(server_round: int, sent: Iterable[int], replies: Iterable[Message], min_replies: int) -> None:
    """Raise RoundFailedError when fewer than ``min_replies`` of the nodes in ``sent`` replied
    without an error (and at least one node was sent a message)."""
    sent = set(sent)
    if not sent:
        return
    errors, ok = {}, set()
    for reply in replies:
        node = int(reply.metadata.src_node_id)
        if reply.has_error():
            errors[node] = str(reply.error.reason).strip().splitlines()[-1] if reply.error.reason else f"error code {reply.error.code}"
        else:
            ok.add(node)
    if len(ok) >= min_replies:
        return
    silent = sent - ok - set(errors)
    raise RoundFailedError(
        f"round {server_round}: {len(ok)} of {len(sent)} nodes replied without an error, fewer than "
        f"strategy.min-replies = {min_replies}. {failure_summary(errors, silent=silent)}. "
        "The run stops here: the nodes' logs (or the ClientApp's in simulation) have the full errors."
    )


class Quorum(StrategyWrapper):
    """``strategy`` whose every training round must get ``min_replies`` replies without an
    error (see the module docstring). Everything else is handed to ``strategy``."""

    def __init__(self, strategy: Strategy, *, min_replies: int) -> None:
        if min_replies < 1:
            raise ValueError(f"min_replies must be at least 1, got {min_replies}")
        super().__init__(strategy)
        self.min_replies = min_replies
        self._sent: dict[int, list[int]] = {}

    def configure_train(self, server_round, arrays, config, grid) -> Iterable[Message]:
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self._sent[server_round] = [int(m.metadata.dst_node_id) for m in messages]
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        result = self.strategy.aggregate_train(server_round, replies)  # books the round first
        check_quorum(server_round, self._sent.pop(server_round, []), replies, self.min_replies)
        return result
