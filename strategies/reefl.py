"""ReeFL (Lee et al., ICML 2024): one shared recurrent exit module and head for all exits,
per-client self-distillation from the client's best exit.

Server side it is layer-wise averaging (strategies/early_exit.py); the shared module and
head are held by every node and so averaged over everyone. The method lives in the model
(``exit_kind = "ree"``, ml/early_exit.py: ReeModule) and the local loss: the sum of the
exits' cross-entropies plus, weighted by a ramp over rounds, KL from the exit with the
lowest moving-average loss on that client (the teacher, detached) to every other exit.
"""

from .early_exit import EarlyExitStrategy


class ReeFL(EarlyExitStrategy):
    exit_kind = "ree"
    client_method = "reefl"
