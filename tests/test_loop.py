"""The one training loop (ml/loop.py): what a step does, in what order, on a model with
one weight, where every gradient is a number you can check by hand.

Model: ``y_hat = w * x``; loss ``mean((w x - y)^2)``; at w = 1 with x = 1, y = 0 the data
gradient is ``2 (w x - y) x = 2``. AdamW's first step moves every weight by about the
learning rate against the sign of its gradient, so the sign of the update says which
gradient the optimizer saw."""

import numpy as np
import pytest
import torch
from torch import nn

from ml import loop
from ml.privacy import DPSGD


class OneWeight(nn.Module):
    def __init__(self, w: float = 1.0) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([w]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w * x


class Points:
    def __init__(self, n: int) -> None:
        self.x = np.ones(n, np.float32)
        self.y = np.zeros(n, np.float32)

    def __len__(self) -> int:
        return len(self.x)


class Fit:
    """The task: squared error of ``w x`` against ``y``."""

    served = 0

    def batch(self, data: Points, index: np.ndarray) -> dict:
        self.served += 1
        return {"x": torch.from_numpy(data.x[index]), "y": torch.from_numpy(data.y[index])}

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return ((model(batch["x"]) - batch["y"]) ** 2).mean()


LR = 0.1


def train(model, task, data, **options):
    groups = [{"params": [model.w], "lr": LR}]
    return loop.train(model, task, data, groups=groups, **{"batch_size": 2, "seed": 0, **options})


def test_one_step_follows_the_data_gradient():
    model = OneWeight()
    result = train(model, Fit(), Points(4), steps=1)
    assert result.loss == pytest.approx(1.0)  # (1 * 1 - 0)^2
    assert model.w.item() == pytest.approx(1.0 - LR, rel=1e-4)  # gradient +2: w goes down by lr
    assert result.ledger is None and result.empty_steps == 0
    assert not model.training  # left in eval mode


def test_the_loop_takes_exactly_the_steps_it_is_given():
    for steps in (1, 3, 5):
        task = Fit()
        got: list[float] = []
        train(OneWeight(), task, Points(4), steps=steps, losses=got)
        assert task.served == steps and len(got) == steps


def test_on_gradients_sees_the_data_gradient_and_the_regularizer_is_added_after_it():
    """The data gradient is +2 and the regularizer ``-3 w`` adds -3: the optimizer must see
    the sum, -1 (w goes up), and on_gradients the data gradient alone, +2 (it runs first)."""
    seen: list[float] = []
    model = OneWeight()
    result = train(
        model, Fit(), Points(4), steps=1,
        on_gradients=lambda: seen.append(model.w.grad.item()),
        regularizer=lambda m: -3.0 * m.w.sum(),
    )
    assert seen == [pytest.approx(2.0)]
    assert model.w.item() == pytest.approx(1.0 + LR, rel=1e-4)  # 2 - 3 = -1: w goes up
    assert result.loss == pytest.approx(1.0)  # the reported loss is the data loss alone


def test_a_methods_loss_replaces_the_tasks():
    model = OneWeight()
    # minimise -w: the gradient is -1 whatever the data, so w goes up
    result = train(model, Fit(), Points(4), steps=1, loss=lambda m, b: -m.w.sum())
    assert model.w.item() == pytest.approx(1.0 + LR, rel=1e-4)
    assert result.loss == pytest.approx(-1.0)


def test_the_hooks_are_removed_when_the_loop_ends():
    calls: list[int] = []
    model = OneWeight()
    groups = [{"params": [model.w], "lr": LR}]
    optimizer = torch.optim.AdamW(groups)
    batches = iter([{"x": torch.ones(2), "y": torch.zeros(2)}] * 3)
    loop.run(model, optimizer, batches, steps=2, loss=Fit().loss, before_update=[lambda: calls.append(1)])
    assert calls == [1, 1]
    optimizer.zero_grad()
    Fit().loss(model, next(batches)).backward()
    optimizer.step()  # an ordinary step after the loop: the hook no longer runs
    assert calls == [1, 1]


def test_the_same_loop_runs_dp_sgd_and_an_empty_poisson_batch_is_a_noise_only_step():
    """Under DP the loop gets Opacus's model, optimizer and loader: the steps are counted
    in the ledger, including the ones whose Poisson batch drew nobody (three examples at
    q = 1/3: about (2/3)^3 = 0.3 of the steps are empty)."""
    torch.manual_seed(0)
    task = Fit()
    result = train(OneWeight(), task, Points(3), steps=30, batch_size=1, private=DPSGD(1.0, 1.0))
    assert result.ledger.steps == 30 and result.rate == pytest.approx(1 / 3)
    assert 0 < result.empty_steps < 30
    assert task.served == 30 - result.empty_steps  # the task builds a batch only when someone was drawn


def test_train_refuses_a_model_with_nothing_to_train():
    model = OneWeight()
    model.w.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        loop.train(model, Fit(), Points(4), steps=1, batch_size=2, seed=0, learning_rate=LR, head_learning_rate=LR)
