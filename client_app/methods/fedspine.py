"""FedSpine on the device (Yao et al., 2025): prune attention heads and MLP channels to
the ratio the server's bandit chose, gradually while training (ml/pruning.py), with the
unit scores this node kept from earlier rounds; reply with the factors of the pruned
matrices, the unpruned indices they kept, and the losses the bandit's reward uses."""

from __future__ import annotations

import numpy as np

from stamen import keys
from stamen.records import from_record, to_record

from .lora import LoRAMethod, LoRARound, Reply, Trained
from .registry import register


@register("fedspine")
class FedSpine(LoRAMethod):
    def train(self, r: LoRARound, regularizer) -> Trained:
        from ml import pruning

        groups = pruning.unit_groups(r.model)  # before pruning: the unpruned coordinates
        held = r.context.state.array_records.get(keys.STATE_PRUNE_SCORES)
        scores = from_record(held) if held is not None else None
        result = pruning.train_pruned(
            r.model, r.task, r.data, ratio=float(r.instr[keys.PRUNE_RATIO]), scores=scores, private=r.dpsgd, **r.options
        )
        r.context.state[keys.STATE_PRUNE_SCORES] = to_record(result["scores"])
        return Trained(result["loss"], result.get("ledger"), {"result": result, "indices": pruning.module_indices(groups, result["kept"])})

    def reply(self, r: LoRARound, trained: Trained, out: Reply) -> Reply:
        from ml import pruning

        result, indices = trained.extra["result"], trained.extra["indices"]
        for module in r.targets:  # a side no pruning touched is whole: all of its (unchanged) indices
            rows, cols = indices.get(module, (None, None))
            out_dim, in_dim = pruning.weight_of(r.model.get_submodule(module)).shape
            out.arrays[keys.KEPT_PREFIX + module + keys.KEPT_ROWS] = np.arange(out_dim, dtype=np.int64) if rows is None else rows
            out.arrays[keys.KEPT_PREFIX + module + keys.KEPT_COLS] = np.arange(in_dim, dtype=np.int64) if cols is None else cols
        out.metrics.update({
            keys.LOSS_START: result["loss_start"],
            keys.LOSS_END: result["loss_end"],
            keys.LOSS_REFERENCE: result["loss_reference"],
            keys.LOSS_AFTER: result["loss_after"],
        })
        return out
