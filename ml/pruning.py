"""Structured pruning of whole units: attention heads and MLP channels.

A *unit group* is one layer's attention or MLP. Its units are produced by the rows of
some Linear layers (the *producers*) and consumed by the columns of others (the
*consumers*):

| model | attention unit | producers (rows) | consumers (columns) | MLP unit | producers | consumers |
| --- | --- | --- | --- | --- | --- | --- |
| BERT-like | a head | query, key, value | attention.output.dense | a channel | intermediate.dense | output.dense |
| Llama-like | a key/value group (a k/v head and the query heads sharing it) | q_proj, k_proj, v_proj | o_proj | a channel | gate_proj, up_proj | down_proj |

Pruning a unit removes its rows and columns (:func:`prune`), so the model really is
smaller: both attention implementations reshape with ``-1`` heads, and Llama keeps its
query-per-key/value ratio because whole groups go. Zeroing the same rows and columns
instead (:func:`mask`) gives the same outputs; a test checks it.

Importance (:class:`UnitImportance`) comes from the LoRA gradients local training
already computes: a unit's score is the squared norm of the gradient of the LoRA
factors that touch it (B's rows on producers, A's columns on consumers), smoothed over
steps with an exponential moving average. A group with no LoRA on it falls back to the
norm of its producers' weight rows.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .data import batch_indices
from .loop import train
from .privacy import DPSGD
from .tasks import to_device


@dataclass(frozen=True)
class UnitGroup:
    name: str  # e.g. "encoder.layer.3.attention"
    kind: str  # "heads" | "channels"
    producers: tuple[tuple[str, int], ...]  # (module name, rows per unit)
    consumers: tuple[str, ...]  # module names; columns per unit = cols_per_unit
    cols_per_unit: int
    num_units: int

    def rows(self, rows_per_unit: int, units: Sequence[int]) -> np.ndarray:
        return np.concatenate([np.arange(u * rows_per_unit, (u + 1) * rows_per_unit) for u in units]).astype(np.int64) if len(units) else np.zeros(0, np.int64)

    def cols(self, units: Sequence[int]) -> np.ndarray:
        return self.rows(self.cols_per_unit, units)


def _linear(module: nn.Module) -> nn.Linear:
    """The Linear holding the weight: the module itself, or a peft LoRA layer's base."""
    return getattr(module, "base_layer", module)


def weight_of(module: nn.Module) -> torch.Tensor:
    """The weight of a Linear or of a peft LoRA layer's base Linear."""
    return _linear(module).weight


def unit_groups(model: nn.Module) -> list[UnitGroup]:
    """Every prunable group of a BERT-like or Llama-like model, in module order."""
    groups = []
    for name, module in model.named_modules():
        if hasattr(module, "query") and hasattr(module, "key") and hasattr(module, "value"):  # BertSelfAttention
            parent = name.rsplit(".", 1)[0]  # ...attention
            head = module.attention_head_size
            n = _linear(module.query).out_features // head
            rows = ((f"{name}.query", head), (f"{name}.key", head), (f"{name}.value", head))
            groups.append(UnitGroup(parent, "heads", rows, (f"{parent}.output.dense",), head, n))
        elif hasattr(module, "q_proj") and hasattr(module, "o_proj") and hasattr(module, "head_dim"):  # Llama-like
            head = module.head_dim
            kv = _linear(module.k_proj).out_features // head
            q_per_kv = _linear(module.q_proj).out_features // head // kv
            rows = ((f"{name}.q_proj", head * q_per_kv), (f"{name}.k_proj", head), (f"{name}.v_proj", head))
            groups.append(UnitGroup(name, "heads", rows, (f"{name}.o_proj",), head * q_per_kv, kv))
        elif hasattr(module, "gate_proj") and hasattr(module, "up_proj") and hasattr(module, "down_proj"):
            n = _linear(module.gate_proj).out_features
            groups.append(UnitGroup(name, "channels", ((f"{name}.gate_proj", 1), (f"{name}.up_proj", 1)), (f"{name}.down_proj",), 1, n))
        elif name.endswith(".intermediate") and hasattr(module, "dense"):  # BertIntermediate
            parent = name.rsplit(".", 1)[0]
            n = _linear(module.dense).out_features
            groups.append(UnitGroup(f"{parent}.mlp", "channels", ((f"{name}.dense", 1),), (f"{parent}.output.dense",), 1, n))
    return groups


@torch.no_grad()
def _slice_rows(module: nn.Module, index: torch.Tensor) -> None:
    base = _linear(module)
    base.weight = nn.Parameter(base.weight[index].clone(), requires_grad=base.weight.requires_grad)
    if base.bias is not None:
        base.bias = nn.Parameter(base.bias[index].clone(), requires_grad=base.bias.requires_grad)
    base.out_features = len(index)
    for lora_b in getattr(module, "lora_B", {}).values():  # peft: B is (out, r)
        lora_b.weight = nn.Parameter(lora_b.weight[index].clone(), requires_grad=lora_b.weight.requires_grad)
        lora_b.out_features = len(index)
    if hasattr(module, "out_features"):
        module.out_features = len(index)


@torch.no_grad()
def _slice_cols(module: nn.Module, index: torch.Tensor) -> None:
    base = _linear(module)
    base.weight = nn.Parameter(base.weight[:, index].clone(), requires_grad=base.weight.requires_grad)
    base.in_features = len(index)
    for lora_a in getattr(module, "lora_A", {}).values():  # peft: A is (r, in)
        lora_a.weight = nn.Parameter(lora_a.weight[:, index].clone(), requires_grad=lora_a.weight.requires_grad)
        lora_a.in_features = len(index)
    if hasattr(module, "in_features"):
        module.in_features = len(index)


def prune(model: nn.Module, keep: Mapping[str, Sequence[int]]) -> None:
    """Remove every unit not in ``keep[group name]`` (in place). Groups not named are left
    whole. Keep at least one unit per group."""
    groups = {g.name: g for g in unit_groups(model)}
    for name, units in keep.items():
        group = groups[name]
        units = sorted({int(u) for u in units})
        if not units or units[0] < 0 or units[-1] >= group.num_units:
            raise ValueError(f"{name}: keep 1..{group.num_units} units in 0..{group.num_units - 1}, got {units}")
        for module, per_unit in group.producers:
            _slice_rows(model.get_submodule(module), torch.as_tensor(group.rows(per_unit, units)))
        for module in group.consumers:
            _slice_cols(model.get_submodule(module), torch.as_tensor(group.cols(units)))


@torch.no_grad()
def mask(model: nn.Module, keep: Mapping[str, Sequence[int]]) -> None:
    """Zero the rows and columns :func:`prune` would remove (in place; shapes unchanged)."""
    groups = {g.name: g for g in unit_groups(model)}
    for name, units in keep.items():
        group = groups[name]
        dropped = sorted(set(range(group.num_units)) - {int(u) for u in units})
        for module, per_unit in group.producers:
            base = _linear(model.get_submodule(module))
            rows = torch.as_tensor(group.rows(per_unit, dropped))
            base.weight[rows] = 0.0
            if base.bias is not None:
                base.bias[rows] = 0.0
        for module in group.consumers:
            _linear(model.get_submodule(module)).weight[:, torch.as_tensor(group.cols(dropped))] = 0.0


def keep_most_important(scores: Mapping[str, np.ndarray], ratio: float) -> dict[str, list[int]]:
    """Per group, keep the ``1 - ratio`` share of units with the highest scores (at least
    one), in index order."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"pruning ratio {ratio}: must lie in [0, 1)")
    keep = {}
    for name, s in scores.items():
        n = max(1, int(round(len(s) * (1.0 - ratio))))
        keep[name] = sorted(int(i) for i in np.argsort(-np.asarray(s), kind="stable")[:n])
    return keep


class UnitImportance:
    """Per-unit scores from LoRA gradients, smoothed over steps: call :meth:`update` after
    ``backward()`` and before ``zero_grad``."""

    def __init__(self, model: nn.Module, *, smoothing: float = 0.9) -> None:
        self.model, self.smoothing = model, smoothing
        self.groups = unit_groups(model)
        self.scores: dict[str, np.ndarray] = {}

    def _grad_score(self, group: UnitGroup) -> np.ndarray | None:
        total, seen = np.zeros(group.num_units), False
        for module_name, per_unit in group.producers:
            for lora_b in getattr(self.model.get_submodule(module_name), "lora_B", {}).values():
                if lora_b.weight.grad is not None:
                    rows = lora_b.weight.grad.detach().pow(2).sum(1).cpu().numpy()
                    total += rows.reshape(group.num_units, per_unit).sum(1)
                    seen = True
        for module_name in group.consumers:
            for lora_a in getattr(self.model.get_submodule(module_name), "lora_A", {}).values():
                if lora_a.weight.grad is not None:
                    cols = lora_a.weight.grad.detach().pow(2).sum(0).cpu().numpy()
                    total += cols.reshape(group.num_units, group.cols_per_unit).sum(1)
                    seen = True
        return total if seen else None

    def _weight_score(self, group: UnitGroup) -> np.ndarray:
        total = np.zeros(group.num_units)
        for module_name, per_unit in group.producers:
            w = _linear(self.model.get_submodule(module_name)).weight.detach().pow(2).sum(1).cpu().numpy()
            total += w.reshape(group.num_units, per_unit).sum(1)
        return total

    def update(self) -> None:
        for group in self.groups:
            score = self._grad_score(group)
            if score is None:
                score = self._weight_score(group)
            old = self.scores.get(group.name)
            self.scores[group.name] = score if old is None or old.shape != score.shape else self.smoothing * old + (1 - self.smoothing) * score


def keep_count(num_units: int, ratio: float) -> int:
    """How many of ``num_units`` a pruning ratio keeps (at least one)."""
    return max(1, int(round(num_units * (1.0 - ratio))))


def module_indices(groups: Sequence[UnitGroup], kept: Mapping[str, np.ndarray]) -> dict[str, tuple[np.ndarray | None, np.ndarray | None]]:
    """{module: (kept rows, kept columns)} in the unpruned model's coordinates, for every
    producer and consumer of the groups (``kept[group]``: the unpruned unit numbers kept).
    ``None``: that side is whole."""
    out: dict[str, list] = {}
    for g in groups:
        units = np.asarray(kept[g.name])
        for module, per_unit in g.producers:
            out.setdefault(module, [None, None])[0] = g.rows(per_unit, units)
        for module in g.consumers:
            out.setdefault(module, [None, None])[1] = g.cols(units)
    return {m: (r, c) for m, (r, c) in out.items()}


PROBE_BATCHES = 1  # the reward's before/after batch: two forward passes a round (docs/pruning.md measures them)


@torch.no_grad()
def probe_loss(model: nn.Module, task, data, batches: Sequence[np.ndarray]) -> float:
    """The mean loss over ``batches`` (index arrays), in eval mode, without gradients."""
    was_training = model.training
    model.eval()
    try:
        return float(np.mean([task.loss(model, to_device(task.batch(data, b), model)).item() for b in batches]))
    finally:
        model.train(was_training)


def train_pruned(
    model: nn.Module,
    task,
    data,
    *,
    ratio: float,
    steps: int,
    seed: int,
    scores: Mapping[str, np.ndarray] | None = None,
    smoothing: float = 0.9,
    private: DPSGD | None = None,
    **train_kwargs,
) -> dict:
    """Local training with gradual structured pruning to ``ratio`` of every group's units.

    With ``scores`` (the unpruned units' importance from an earlier round) the model is
    pruned before the first step and trains pruned throughout. Without, it scores units
    for a quarter of the steps, prunes to ``ratio / 2``, trains and scores another
    quarter, prunes to ``ratio``, and tunes for the rest (prune, then tune to recover).

    Returns {"loss", "loss_start", "loss_end" (means over the first and last quarter of
    the steps), "loss_reference" and "loss_after" (below), "kept" (per group, the unpruned
    unit numbers kept), "scores" (per group, importance of every unpruned unit; pruned
    units keep their last score)}.

    ``loss_reference`` is the model's loss as it arrived, unpruned and untrained, on the
    first :data:`PROBE_BATCHES` batches of the first phase (without DP, the first batches
    ``loss_start`` is measured on), and ``loss_after`` the trained, pruned model's loss on
    the same batches; both in eval mode.
    The bandit's reward compares these two: pruning damage cannot inflate the reference,
    whereas ``loss_start`` of a node that prunes before its first step includes it.

    ``private``: DP-SGD (ml/privacy.py). Each phase is then its own Opacus run (the model
    changes shape between phases); the importance reads the clipped and noised LoRA
    gradients, so the scores, the units kept and everything pruned from them are
    post-processing of the private gradients. The result's "ledger" is the
    spending including all phases."""
    groups = unit_groups(model)
    full = {g.name: g.num_units for g in groups}
    kept = {g.name: np.arange(g.num_units) for g in groups}
    known = {name: np.asarray(s, dtype=np.float64).copy() for name, s in (scores or {}).items() if len(s) == full.get(name, -1)}
    memory = {name: known.get(name, np.zeros(n)) for name, n in full.items()}

    def prune_to(r: float, current: Mapping[str, np.ndarray]) -> None:
        keep_now = {}
        for name, units in kept.items():
            n = min(len(units), keep_count(full[name], r))
            order = np.argsort(-np.asarray(current[name]), kind="stable")[:n]  # positions in the current model
            keep_now[name] = sorted(int(i) for i in order)
        prune(model, keep_now)
        for name, positions in keep_now.items():
            kept[name] = kept[name][positions]

    quarter = max(1, steps // 4)
    probe = list(itertools.islice(batch_indices(len(data), train_kwargs["batch_size"], seed=seed), PROBE_BATCHES))
    loss_reference = probe_loss(model, task, data, probe)  # before anything is pruned or trained

    losses: list[float] = []
    if ratio > 0 and len(known) == len(full):
        prune_to(ratio, {name: memory[name][kept[name]] for name in kept})
        plan = [(steps, None)]
    elif ratio > 0 and steps >= 2:
        plan = [(quarter, ratio / 2), (quarter, ratio), (steps - 2 * quarter, None)]
    elif ratio > 0:  # one step: score it, then prune (the phases must add up to ``steps``: DP plans for them)
        plan = [(steps, ratio)]
    else:
        plan = [(steps, None)]
    for i, (n_steps, then_ratio) in enumerate(plan):
        importance = UnitImportance(model, smoothing=smoothing)
        if n_steps:
            trained = train(
                model, task, data, steps=n_steps, seed=seed + 104729 * i, on_gradients=importance.update, private=private, losses=losses, **train_kwargs
            )
            if private is not None:  # the next phase continues this one's spending
                private = dataclasses.replace(private, ledger=trained.ledger)
        for name, s in importance.scores.items():
            memory[name][kept[name]] = s
        if then_ratio is not None:
            prune_to(then_ratio, importance.scores)
    quarter = max(1, len(losses) // 4)
    return {
        "loss": float(np.mean(losses)),
        "loss_start": float(np.mean(losses[:quarter])),
        "loss_end": float(np.mean(losses[-quarter:])),
        "loss_reference": loss_reference,
        "loss_after": probe_loss(model, task, data, probe),
        "kept": kept,
        "scores": memory,
        **({"ledger": private.ledger} if private is not None else {}),
    }
