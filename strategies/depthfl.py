"""DepthFL-style baseline (Kim et al., ICLR 2023): one classifier per exit, every client
trains all exits up to its depth with mutual self-distillation (each exit learns from the
others' predictions, detached); layer-wise averaging over the clients that hold a layer.
"""

from .early_exit import EarlyExitStrategy


class DepthFL(EarlyExitStrategy):
    exit_kind = "per-exit"
    client_method = "depthfl"
