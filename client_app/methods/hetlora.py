"""HetLoRA on the device (Cho et al., 2024): a penalty on the tail of the adapter's rank
components while training, and self-pruning the tail when training made it negligible.
The server's side (zero-padding, the tail's size) is strategies/hetlora.py; the tail's
rule is shared (stamen/lora_math.py)."""

from __future__ import annotations

import logging

from stamen import keys
from stamen.lora_math import self_prune_rank, truncate

from .lora import LoRAMethod, LoRARound, Reply, Trained
from .registry import register

log = logging.getLogger("stamen.client")


@register("hetlora")
class HetLoRA(LoRAMethod):
    def regularizer(self, r: LoRARound):
        """``tail-penalty`` x the norm of the last ``tail-fraction`` of the rank components."""
        penalty = float(r.instr.get(keys.TAIL_PENALTY, 0.0))
        if penalty <= 0:
            return None
        from ml.lora import tail_norm

        fraction, targets = float(r.instr[keys.TAIL_FRACTION]), r.targets
        return lambda model: penalty * tail_norm(model, targets, fraction)

    def reply(self, r: LoRARound, trained: Trained, out: Reply) -> Reply:
        """Drop the tail if its norm is below ``prune-threshold`` of the whole adapter's.
        The kept components keep their scaling: alpha / rank stays the same."""
        kept = self_prune_rank(out.factors, rho=float(r.instr[keys.TAIL_FRACTION]), threshold=float(r.instr[keys.PRUNE_THRESHOLD]))
        if kept < out.rank:
            log.info("round %d: HetLoRA self-pruning, rank %d -> %d", r.server_round, out.rank, kept)
            out.factors, out.alpha, out.rank = truncate(out.factors, kept), out.alpha * kept / out.rank, kept
        return out
