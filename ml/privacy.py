"""Client-side differential privacy: DP-SGD on the trainable parameters, through Opacus.

What a node does with ``dp.mode = "local"`` (docs/privacy.md):

* Only the parameters that train (the LoRA factors, the classification head; for ReeFL
  its shared module and head) get per-example gradients, are clipped to
  ``max_grad_norm`` and noised: :func:`make_private` (Opacus's ``PrivacyEngine.make_private``
  underneath) swaps the model, the optimizer and the data loader for private ones, with
  Poisson sampling (each example joins a step's batch with probability
  ``q = 1 / ceil(N / batch_size)``), and the ordinary training loop (ml/loop.py) runs
  them: DP is not a loop of its own.
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
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .layers import ExitTokens, LayerScale

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
class DPSGD:
    """What a node's DP-SGD run takes: the noise multiplier, the clipping norm, and the
    spending before it."""

    noise_multiplier: float
    max_grad_norm: float
    ledger: Ledger = field(default_factory=Ledger)

    def __post_init__(self) -> None:
        if not (self.noise_multiplier > 0 and self.max_grad_norm > 0):
            raise ValueError(f"DP-SGD needs a positive noise multiplier and clipping norm, got {self.noise_multiplier} and {self.max_grad_norm}")


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


def make_private(
    *,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: torch.utils.data.DataLoader,
    noise_multiplier: float,
    max_grad_norm: float,
    ledger: Ledger | None = None,
) -> tuple[nn.Module, PrivateOptimizer, torch.utils.data.DataLoader]:
    """DP-SGD for a model, its optimizer and its data loader: drop-in replacements for the
    three, in the shape of Opacus's ``PrivacyEngine.make_private`` (which does the work):
    a model that records per-example gradients, an optimizer whose ``step()`` clips them
    to ``max_grad_norm`` and adds Gaussian noise of std ``noise_multiplier * max_grad_norm``
    before it updates, and a loader that samples each example with probability
    ``q = 1 / len(data_loader)`` (Poisson; a batch may be empty). Train them with the
    ordinary loop (ml/loop.py), then call the optimizer's ``release()``.

    ``ledger`` is the spending before this run; the optimizer's ``ledger`` is the spending
    including every step it has taken. The noise comes from the OS's entropy
    (:func:`noise_generator`)."""
    from opacus import PrivacyEngine

    DPSGD(noise_multiplier, max_grad_norm)  # validated at the door
    trainable = [p for p in module.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("DP-SGD: the model has no trainable parameter")
    register_grad_samplers()
    module.train()  # Opacus refuses a model in eval mode
    engine = PrivacyEngine(accountant=ACCOUNTANT)
    engine.accountant.history = list((ledger or Ledger()).history)
    private_module, dp_optimizer, private_loader = engine.make_private(
        module=module,
        optimizer=optimizer,
        data_loader=data_loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        poisson_sampling=True,
        noise_generator=noise_generator(trainable[0].device),
    )
    return private_module, PrivateOptimizer(dp_optimizer, engine, module, private_module, float(private_loader.sample_rate)), private_loader


class PrivateOptimizer:
    """The optimizer :func:`make_private` returns. ``step()`` is one DP-SGD step:

    1. an empty Poisson batch (the loop ran no backward) gets zero per-example gradients,
       so the step is noise alone, as DP-SGD's analysis assumes;
    2. the first step with data checks that Opacus saw every trainable parameter
       (:func:`check_per_example_gradients`);
    3. Opacus clips and noises: the private gradient is in ``p.grad``;
    4. the step pre-hooks run: what they read is post-processing, what they add to
       ``p.grad`` must not read the data (a regularizer on the weights);
    5. the wrapped optimizer (AdamW) updates.

    A plain torch optimizer's pre-hooks run at the same point of a step (after backward,
    before the update), so the loop registers them the same way on both."""

    def __init__(self, dp_optimizer, engine, module: nn.Module, private_module: nn.Module, sample_rate: float) -> None:
        self._dp = dp_optimizer
        self._engine = engine
        self._module = module
        self._private_module = private_module
        self._hooks: OrderedDict[int, Callable] = OrderedDict()  # RemovableHandle needs a weak-referenceable dict
        self._checked = False
        self.sample_rate = sample_rate
        self.empty_steps = 0

    @property
    def param_groups(self) -> list[dict]:
        return self._dp.param_groups

    @property
    def ledger(self) -> Ledger:
        return Ledger([(float(z), float(q), int(s)) for z, q, s in self._engine.accountant.history])

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._dp.zero_grad(set_to_none=set_to_none)

    def register_step_pre_hook(self, hook: Callable) -> RemovableHandle:
        """``hook(optimizer, args, kwargs)`` runs in step 4 (class docstring)."""
        handle = RemovableHandle(self._hooks)
        self._hooks[handle.id] = hook
        return handle

    def step(self) -> None:
        params = self._dp.params
        if all(getattr(p, "grad_sample", None) is None for p in params):
            self.empty_steps += 1
            for p in params:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        elif not self._checked:
            check_per_example_gradients(self._module)
            self._checked = True
        if self._dp.pre_step():  # clipped and noised gradients are in p.grad now
            for hook in list(self._hooks.values()):
                hook(self, (), {})
            self._dp.original_optimizer.step()

    def release(self) -> None:
        """Remove Opacus's hooks and per-example gradients from the model, so it trains and
        evaluates as before (the same model object is used after the round)."""
        self._private_module.eval()
        if hasattr(self._private_module, "_close"):
            self._private_module._close()
        for p in self._private_module.parameters():
            for name in ("grad_sample", "_forward_counter", "_current_grad_sample"):
                if hasattr(p, name):
                    delattr(p, name)


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
