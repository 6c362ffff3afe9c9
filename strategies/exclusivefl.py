"""ExclusiveFL baseline: only clients that can hold the full model train (all exits,
one classifier each, losses summed); shallower clients sit the rounds out.
"""

from .early_exit import EarlyExitStrategy


class ExclusiveFL(EarlyExitStrategy):
    exit_kind = "per-exit"
    client_method = "exclusivefl"

    def trains(self, max_exit: int) -> bool:
        return max_exit == self.num_exits
