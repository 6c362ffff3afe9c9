"""InclusiveFL (Liu et al., 2022) on the device: the cross-entropy of the node's deepest
exit only (its one head)."""

from __future__ import annotations

from ml.early_exit import exit_cross_entropy

from .early_exit import EarlyExitMethod
from .registry import register


@register("inclusivefl")
class InclusiveFL(EarlyExitMethod):
    def loss(self, logits, labels, *, teacher, distill_weight, temperature):
        ce = exit_cross_entropy(logits, labels)
        return ce[-1], ce.detach()
