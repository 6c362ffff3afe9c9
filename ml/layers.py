"""Two small layers of the early-exit model (ml/early_exit.py) that Opacus needs
per-example gradient rules for (ml/privacy.py). They live apart so that both modules
import them, and neither imports the other for them."""

from __future__ import annotations

import torch
from torch import nn


class ExitTokens(nn.Module):
    """The Ree module's input sequence: a learnable meta token before the features of
    blocks 1..n, plus a learned positional embedding per position.

    Its own module (not parameters of :class:`ReeModule`) so that every parameter is used
    inside the forward of the module that holds it: Opacus's per-example gradients
    (ml/privacy.py) are computed per module from that module's input and output."""

    def __init__(self, dim: int, num_blocks: int) -> None:
        super().__init__()
        self.meta = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.position = nn.Parameter(torch.randn(1, num_blocks + 1, dim) * 0.02)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b, n, _ = features.shape
        return torch.cat([self.meta.expand(b, -1, -1), features], dim=1) + self.position[:, : n + 1]


class LayerScale(nn.Module):
    """``scale * x`` with one learned scale per channel."""

    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x
