"""``StrategyWrapper``: a Flower Strategy that hands every call to the strategy it wraps.

The cross-cutting features of a run (timing, the simulated clock, the quorum of replies,
a resumed run's round numbers) each wrap whatever strategy runs, as Flower's DP wrappers
do, and override only the calls they change. Attributes the wrapper does not have are
read from the wrapped strategy, so wrappers stack in any order.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy


class StrategyWrapper(Strategy):
    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy

    def __getattr__(self, name):
        if name == "strategy":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.strategy, name)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()
