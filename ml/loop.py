"""The one local-training loop. Every method on the device trains through :func:`train`:
plain LoRA, HetLoRA (a regularizer), FedSpine (reads the gradients, prunes between
calls), the early-exit objectives (a loss), and each of them under local DP.

A step is the same everywhere::

    batch = next(batches)
    optimizer.zero_grad()
    loss(model, batch).backward()        # skipped for an empty batch (DP's Poisson sampling)
    optimizer.step()                     # its step pre-hooks see the final gradients

What differs between methods goes in through three arguments, and nothing else:

- ``loss(model, batch) -> tensor``: the per-batch loss (the task's, or a method's
  objective). Under DP it must be a mean over the batch of terms that each depend on one
  example only (:func:`ml.privacy.example_loss` is the task's in that form).
- ``regularizer(model) -> tensor``: a term that reads no data (HetLoRA's tail norm). Its
  gradient is added to the step's gradient once that is final: under DP after clipping
  and noise, which costs no privacy.
- ``on_gradients()``: reads the step's final data gradients before the regularizer's are
  added (FedSpine's unit importance); under DP that is post-processing.

Local DP is not a second loop: :func:`ml.privacy.make_private` swaps the model, the
optimizer and the data loader for private ones (Opacus's shape), and the same loop runs
them. Its optimizer clips and noises inside ``step()``, before the pre-hooks run, which is
why the regularizer and ``on_gradients`` are step pre-hooks rather than lines of the loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .data import batch_indices
from .privacy import DPSGD, Ledger, example_loss, make_private
from .tasks import param_groups, to_device

Loss = Callable[[nn.Module, dict], torch.Tensor]


@dataclass
class Trained:
    loss: float  # mean loss over the steps that saw data
    ledger: Ledger | None = None  # DP: the spending including these steps
    rate: float | None = None  # DP: the Poisson sampling rate
    empty_steps: int = 0  # DP: steps whose Poisson batch was empty (noise only)


def batch_size(batch) -> int:
    if isinstance(batch, dict):
        return len(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)):  # Opacus's stand-in for an empty batch: zero-size tensors
        return len(batch[0]) if batch else 0
    return len(batch)


def run(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator,
    *,
    steps: int,
    loss: Loss,
    before_update: Iterable[Callable[[], None]] = (),
    losses: list[float] | None = None,
) -> list[float]:
    """The loop: ``steps`` optimizer steps of ``loss`` on ``batches``; each step's loss
    (steps with an empty batch have none) is appended to ``losses`` and returned.
    ``before_update`` run, in order, as the optimizer's step pre-hooks."""
    losses = [] if losses is None else losses
    handles = [optimizer.register_step_pre_hook(lambda *_, fn=fn: fn()) for fn in before_update]
    model.train()
    try:
        for _ in range(steps):
            batch = next(batches)
            optimizer.zero_grad(set_to_none=True)
            if batch_size(batch):
                value = loss(model, to_device(batch, model))
                value.backward()
                losses.append(value.item())
            optimizer.step()
    finally:
        model.eval()
        for handle in handles:
            handle.remove()
    return losses


def add_gradient_of(regularizer: Callable[[nn.Module], torch.Tensor], model: nn.Module) -> Callable[[], None]:
    """A pre-hook that adds ``regularizer(model)``'s gradient to the trainable parameters'."""
    trainable = [p for p in model.parameters() if p.requires_grad]

    def add() -> None:
        extra = torch.autograd.grad(regularizer(model), trainable, allow_unused=True)
        for p, g in zip(trainable, extra, strict=True):
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g

    return add


def shuffled_batches(task, data, batch_size: int, seed: int) -> Iterator[dict]:
    """Batches of ``batch_size`` from shuffled passes over ``data`` (ml/data.py)."""
    for index in batch_indices(len(data), batch_size, seed=seed):
        yield task.batch(data, index)


def train(
    model: nn.Module,
    task,
    data,
    *,
    steps: int,
    batch_size: int,
    seed: int,
    learning_rate: float | None = None,
    head_learning_rate: float | None = None,
    groups: list[dict] | None = None,
    loss: Loss | None = None,
    regularizer: Callable[[nn.Module], torch.Tensor] | None = None,
    on_gradients: Callable[[], None] | None = None,
    private: DPSGD | None = None,
    losses: list[float] | None = None,
) -> Trained:
    """``steps`` AdamW steps on ``model``'s trainable parameters; the model is left in eval mode.

    The parameter groups are the LoRA/head groups at ``learning_rate`` /
    ``head_learning_rate`` (:func:`ml.tasks.param_groups`), or instead explicit ``groups``.
    ``loss`` defaults to the task's (under DP, its per-example form). ``private``: DP-SGD
    with that noise, clipping norm and ledger. ``losses``, if given, receives each step's
    loss. Module docstring: what the hooks may do."""
    rates = (learning_rate, head_learning_rate)
    if groups is None and None in rates:
        raise TypeError("train needs learning_rate and head_learning_rate, or explicit parameter groups")
    if groups is not None and rates != (None, None):
        raise TypeError("train takes explicit parameter groups or learning rates, not both")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("train: the model has no trainable parameter")
    optimizer = torch.optim.AdamW(groups if groups is not None else param_groups(model, learning_rate, head_learning_rate), weight_decay=0.0)
    hooks = [h for h in (on_gradients, regularizer and add_gradient_of(regularizer, model)) if h is not None]
    losses = [] if losses is None else losses
    first = len(losses)
    if private is None:
        run(model, optimizer, shuffled_batches(task, data, batch_size, seed), steps=steps, loss=loss or task.loss, before_update=hooks, losses=losses)
        return Trained(loss=float(np.mean(losses[first:])))

    torch.manual_seed(seed)  # Poisson sampling (the data order) draws from torch's generator: reproducible
    loader = index_loader(task, data, batch_size)
    dp_model, dp_optimizer, dp_loader = make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=private.noise_multiplier,
        max_grad_norm=private.max_grad_norm, ledger=private.ledger,
    )
    try:
        objective = loss or (lambda m, b: example_loss(task, m, b))
        run(dp_model, dp_optimizer, epochs(dp_loader), steps=steps, loss=objective, before_update=hooks, losses=losses)
    finally:
        dp_optimizer.release()
    mean = float(np.mean(losses[first:])) if len(losses) > first else float("nan")
    return Trained(loss=mean, ledger=dp_optimizer.ledger, rate=dp_optimizer.sample_rate, empty_steps=dp_optimizer.empty_steps)


class _Indices(torch.utils.data.Dataset):
    """Example i is ``(tensor(i),)``: the loader samples indices; the task builds batches.
    A tuple of tensors is the form Opacus's empty-batch handling expects."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return (torch.tensor(i, dtype=torch.long),)


def index_loader(task, data, batch_size: int) -> torch.utils.data.DataLoader:
    """A data loader over ``data``'s example indices whose batches the task builds: the
    loader :func:`ml.privacy.make_private` turns into a Poisson-sampling one."""
    return torch.utils.data.DataLoader(
        _Indices(len(data)), batch_size=batch_size, collate_fn=lambda items: task.batch(data, np.array([int(i) for (i,) in items]))
    )


def epochs(loader: Iterable) -> Iterator:
    """``loader``'s batches, pass after pass, for as many steps as the loop takes."""
    while True:
        yield from loader
