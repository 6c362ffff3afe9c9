"""InclusiveFL-style baseline (Liu et al., KDD 2022): one classifier per exit; a client
trains its sub-model through its deepest exit only (no loss on the shallower exits);
layer-wise averaging. (InclusiveFL's momentum distillation of deep layers into shallow
ones is not part of this baseline.)
"""

from .early_exit import EarlyExitStrategy


class InclusiveFL(EarlyExitStrategy):
    exit_kind = "per-exit"
    client_method = "inclusivefl"

    def holds(self, name: str, max_exit: int) -> bool:
        """A node trains only its deepest exit's head: the shallower heads are neither sent
        nor averaged with its (untouched) copies."""
        if name.startswith("heads."):
            return self.required_exits.get(name, 1) == max_exit
        return super().holds(name, max_exit)
