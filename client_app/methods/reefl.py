"""ReeFL (Lee et al., 2024) on the device: every exit's cross-entropy, plus self-
distillation from the teacher exit (the one with the lowest moving-average loss) into
the others, weighted by the server's per-node ``distill-weight``."""

from __future__ import annotations

from ml.early_exit import exit_cross_entropy, self_distillation_loss

from .early_exit import EarlyExitMethod
from .registry import register


@register("reefl")
class ReeFL(EarlyExitMethod):
    def loss(self, logits, labels, *, teacher, distill_weight, temperature):
        ce = exit_cross_entropy(logits, labels)
        distill = distill_weight * self_distillation_loss(logits, teacher, temperature) if distill_weight else 0.0
        return ce.sum() + distill, ce.detach()
