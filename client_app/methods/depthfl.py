"""DepthFL (Kim et al., 2023) on the device: every exit's cross-entropy, plus mutual
distillation, each exit learning from the mean of the others."""

from __future__ import annotations

from ml.early_exit import exit_cross_entropy, mutual_distillation_loss

from .early_exit import EarlyExitMethod
from .registry import register


@register("depthfl")
class DepthFL(EarlyExitMethod):
    def loss(self, logits, labels, *, teacher, distill_weight, temperature):
        ce = exit_cross_entropy(logits, labels)
        distill = distill_weight * mutual_distillation_loss(logits, temperature) if distill_weight else 0.0
        return ce.sum() + distill, ce.detach()
