"""ExclusiveFL on the device: the sum of every exit's cross-entropy, no distillation
(the baseline in which only full-depth nodes take part, by the server's choice)."""

from __future__ import annotations

from ml.early_exit import exit_cross_entropy

from .early_exit import EarlyExitMethod
from .registry import register


@register("exclusivefl")
class ExclusiveFL(EarlyExitMethod):
    def loss(self, logits, labels, *, teacher, distill_weight, temperature):
        ce = exit_cross_entropy(logits, labels)
        return ce.sum(), ce.detach()
