"""Client-side differential privacy: DP-SGD on the trainable parameters, through Opacus.

What a node does with ``dp.mode = "local"`` (docs/privacy.md):

* Only the parameters that train (the LoRA factors, the classification head; for ReeFL
  its shared module and head) get per-example gradients, are clipped to
  ``max_grad_norm`` and noised: Opacus's ``PrivacyEngine.make_private`` wraps the model,
  the optimizer and a data loader with Poisson sampling (each example joins a step's
  batch with probability ``q = 1 / ceil(N / batch_size)``).
* The privacy unit is one example: one article for classification, one sequence for a
  causal LM, whose loss is the mean over the batch of each sequence's token mean
  (:func:`example_loss`), not the token mean over the whole batch (that would let one
  sequence's length scale every other sequence's gradient).
* The accountant's history, ``[(noise multiplier, sample rate, steps), ...]``, is the
  node's whole spending since the start of the run: it is loaded before a round and
  saved after it (the ClientApp keeps it in ``context.state``), so epsilon is
  cumulative. :class:`Ledger` holds it and answers "what would epsilon be after this
  round?" before anything trains.

Not covered by the guarantee: the number of examples and the training loss a node
reports, and the choices made from them (docs/privacy.md says which ones).
"""

from __future__ import annotations

import functools
import math
import secrets
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .layers import ExitTokens, LayerScale
from .tasks import param_groups, to_device

ACCOUNTANT = "rdp"  # Opacus's Renyi-DP accountant; its history is what a node keeps


def sample_rate(num_examples: int, batch_size: int) -> float:
    """The Poisson sampling rate Opacus's DPDataLoader uses for a loader of this size:
    one over the number of batches of an epoch."""
    if num_examples < 1:
        raise ValueError("DP-SGD needs at least one example on the node")
    return 1.0 / math.ceil(num_examples / batch_size)


def noise_for_budget(*, epsilon: float, delta: float, rate: float, steps: int) -> float:
    """The smallest noise multiplier (within Opacus's tolerance) that keeps ``steps`` steps
    at sampling rate ``rate`` within (epsilon, delta)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=rate, steps=steps, accountant=ACCOUNTANT)
    )


@dataclass
class Ledger:
    """A node's privacy spending so far: Opacus accountant history entries."""

    history: list[tuple[float, float, int]] = field(default_factory=list)

    def epsilon(self, delta: float) -> float:
        """Epsilon at ``delta`` of everything spent, from a fresh Opacus accountant."""
        if not self.history:
            return 0.0
        from opacus.accountants import RDPAccountant

        accountant = RDPAccountant()
        accountant.history = list(self.history)
        return float(accountant.get_epsilon(delta=delta))

    def after(self, noise_multiplier: float, rate: float, steps: int) -> Ledger:
        return Ledger([*self.history, (float(noise_multiplier), float(rate), int(steps))])

    @property
    def steps(self) -> int:
        return sum(int(s) for _, _, s in self.history)

    def to_array(self) -> np.ndarray:
        return np.asarray(self.history, dtype=np.float64).reshape(-1, 3)

    @classmethod
    def from_array(cls, array: np.ndarray) -> Ledger:
        array = np.asarray(array, dtype=np.float64).reshape(-1, 3)
        return cls([(float(z), float(q), int(s)) for z, q, s in array])


@dataclass(frozen=True)
class PrivateResult:
    loss: float  # mean training loss over the non-empty steps
    ledger: Ledger  # the spending including this round
    rate: float
    empty_steps: int  # Poisson drew no example: the step was noise only


class _Indices(torch.utils.data.Dataset):
    """Example i is ``(tensor(i),)``: the loader samples indices; the task builds batches.
    A tuple of tensors is the form Opacus's empty-batch handling expects."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return (torch.tensor(i, dtype=torch.long),)


def example_loss(task, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The mean over the batch of each example's own loss: the form DP-SGD needs (a causal
    LM's usual loss is the token mean over the batch, in which examples weigh each other)."""
    own = getattr(task, "example_loss", None)
    return own(model, batch) if own is not None else task.loss(model, batch)


@functools.cache
def register_grad_samplers() -> None:
    """Opacus per-example gradient rules for the early-exit model's own small layers
    (ml/layers.py). Without them Opacus falls back to functorch, which re-runs the
    layer per example: correct (a test compares both with one-example-at-a-time
    gradients) but slower, since ReeFL's module runs after every block. Runs once per process."""
    from opacus.grad_sample import register_grad_sampler

    @register_grad_sampler(LayerScale)
    def _layer_scale(layer: LayerScale, activations, backprops: torch.Tensor) -> dict:
        # y = scale * x: example i's gradient is the sum over its positions of x * dL/dy
        x = activations[0]
        if not layer.scale.requires_grad:
            return {}
        return {layer.scale: (x * backprops).reshape(x.shape[0], -1, x.shape[-1]).sum(1)}

    @register_grad_sampler(ExitTokens)
    def _exit_tokens(layer: ExitTokens, activations, backprops: torch.Tensor) -> dict:
        # y = [meta; features] + position[:n+1]: dL/dmeta is dL/dy at position 0, and
        # dL/dposition is dL/dy at the positions used (zero past them)
        out = {}
        if layer.meta.requires_grad:
            out[layer.meta] = backprops[:, None, :1]
        if layer.position.requires_grad:
            grad = backprops.new_zeros((backprops.shape[0], *layer.position.shape))
            grad[:, 0, : backprops.shape[1]] = backprops
            out[layer.position] = grad
        return out


def noise_generator(device: torch.device) -> torch.Generator:
    """The DP-SGD noise's generator, seeded from the OS's entropy: the seeds in the run
    config are known to the server and to every node, and noise drawn from them could be
    regenerated and subtracted from the update. (Opacus's ``secure_mode`` would need
    ``torchcsprng``; this is torch's ordinary generator with an unguessable seed.)"""
    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(63))
    return generator


def train_private(
    model: nn.Module,
    task,
    data,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float | None = None,
    head_learning_rate: float | None = None,
    seed: int,
    noise_multiplier: float,
    max_grad_norm: float,
    ledger: Ledger | None = None,
    regularizer=None,
    losses: list[float] | None = None,
    loss=None,
    groups: list[dict] | None = None,
    on_step=None,
) -> PrivateResult:
    """``steps`` DP-SGD steps (AdamW on the privatized gradients) of the trainable
    parameters; returns the mean loss and the ledger with this round added.

    ``regularizer(model) -> tensor`` must not read the data (HetLoRA's tail norm): its
    gradient is added after clipping and noise, which costs no privacy.

    ``loss(model, batch) -> tensor``, if given, replaces the task's per-example loss (the
    early-exit objectives): it must be a mean over the batch of terms that each depend on
    one example only. The optimizer's parameter groups are either the LoRA/head groups at
    ``learning_rate`` / ``head_learning_rate`` or, instead, the explicit ``groups``. ``on_step()``,
    if given, runs once the step's clipped and noised gradients are in ``p.grad`` (before
    the regularizer's): what it reads of them is post-processing and costs no privacy
    (FedSpine's unit importance).

    The first non-empty step checks that Opacus saw every trainable parameter: the mean
    of its per-example gradients must equal its ordinary gradient. A parameter used
    outside the forward of the module that holds it gets no (or a wrong) per-example
    gradient, and would otherwise be trained on noise alone while the loss looks fine."""
    from opacus import PrivacyEngine

    if noise_multiplier <= 0 or max_grad_norm <= 0:
        raise ValueError(f"DP-SGD needs a positive noise multiplier and clipping norm, got {noise_multiplier} and {max_grad_norm}")
    rates = (learning_rate, head_learning_rate)
    if groups is None and None in rates:
        raise TypeError("train_private needs learning_rate and head_learning_rate, or explicit parameter groups")
    if groups is not None and rates != (None, None):
        raise TypeError("train_private takes explicit parameter groups or learning rates, not both")
    ledger = ledger or Ledger()
    register_grad_samplers()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("DP-SGD: the model has no trainable parameter")
    if groups is None:
        groups = param_groups(model, learning_rate, head_learning_rate)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    loss_of = loss if loss is not None else (lambda m, b: example_loss(task, m, b))
    loader = torch.utils.data.DataLoader(
        _Indices(len(data)),
        batch_size=batch_size,
        collate_fn=lambda items: task.batch(data, np.array([int(i) for (i,) in items])),
    )
    torch.manual_seed(seed)  # Poisson sampling (the data order) draws from torch's generator: reproducible
    model.train()  # Opacus refuses a model in eval mode
    engine = PrivacyEngine(accountant=ACCOUNTANT)
    engine.accountant.history = list(ledger.history)
    private_model, dp_optimizer, dp_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        poisson_sampling=True,
        noise_generator=noise_generator(trainable[0].device),
    )
    rate = float(dp_loader.sample_rate)  # = sample_rate(len(data), batch_size)
    losses = [] if losses is None else losses
    first, empty, checked = len(losses), 0, False
    private_model.train()
    batches = iter(dp_loader)
    try:
        for _ in range(steps):
            try:
                batch = next(batches)
            except StopIteration:  # an epoch of the Poisson loader is over: start another
                batches = iter(dp_loader)
                batch = next(batches)
            dp_optimizer.zero_grad(set_to_none=True)
            if _batch_size(batch) == 0:
                # Poisson sampling drew nobody: the step still adds noise (as DP-SGD's analysis assumes)
                empty += 1
                for p in trainable:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            else:
                value = loss_of(private_model, to_device(batch, model))
                value.backward()
                losses.append(value.item())
                if not checked:
                    check_per_example_gradients(model)
                    checked = True
            if dp_optimizer.pre_step():  # clipped and noised gradients are in p.grad now
                if on_step is not None:
                    on_step()
                if regularizer is not None:
                    extra = torch.autograd.grad(regularizer(model), trainable, allow_unused=True)
                    for p, g in zip(trainable, extra, strict=True):
                        if g is not None:
                            p.grad = g if p.grad is None else p.grad + g
                dp_optimizer.original_optimizer.step()
    finally:
        private_model.eval()
        _unwrap(private_model)
    spent = Ledger([(float(z), float(q), int(s)) for z, q, s in engine.accountant.history])
    mean = float(np.mean(losses[first:])) if len(losses) > first else float("nan")
    return PrivateResult(loss=mean, ledger=spent, rate=rate, empty_steps=empty)


def check_per_example_gradients(model: nn.Module, *, rtol: float = 1e-3) -> None:
    """After a backward pass through an Opacus-wrapped model (mean loss reduction): every
    trainable parameter's per-example gradients must average to its ordinary gradient.
    Raises naming the parameters that Opacus computed wrongly or not at all."""
    wrong, unused = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        per_example = getattr(p, "grad_sample", None)
        if p.grad is None:  # autograd never reached it (Opacus may still have filled zeros)
            unused.append(name)
            continue
        if per_example is None:
            wrong.append(f"{name} (no per-example gradient)")
            continue
        error = float((per_example.mean(0) - p.grad).abs().max())
        scale = float(p.grad.abs().max())
        if error > rtol * scale + 1e-8:
            wrong.append(f"{name} (off by {error:.3g}, gradient up to {scale:.3g})")
    if unused:
        raise RuntimeError(
            f"DP-SGD: {len(unused)} trainable parameter(s) take no part in the loss: {', '.join(unused[:5])}"
            f"{' ...' if len(unused) > 5 else ''}. Opacus clips and noises every trainable parameter; freeze "
            "these (requires_grad = False)"
        )
    if wrong:
        raise RuntimeError(
            "DP-SGD: Opacus's per-example gradients do not add up to the gradient of "
            f"{len(wrong)} parameter(s): {', '.join(wrong[:5])}{' ...' if len(wrong) > 5 else ''}. "
            "A parameter used outside the forward of the module that holds it is invisible to "
            "Opacus's hooks and would train on noise alone (ml/early_exit.py: ExitTokens, LayerScale)"
        )


def _batch_size(batch) -> int:
    if isinstance(batch, dict):
        return len(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)):  # Opacus's stand-in when the very first batch is empty
        return len(batch[0]) if batch else 0
    return len(batch)


def _unwrap(private_model) -> None:
    """Remove Opacus's hooks and per-example gradients, so the model trains and
    evaluates as before (the same model object is used after the round)."""
    if hasattr(private_model, "_close"):
        private_model._close()
    for p in private_model.parameters():
        for name in ("grad_sample", "_forward_counter", "_current_grad_sample"):
            if hasattr(p, name):
                delattr(p, name)
