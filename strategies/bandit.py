"""A per-device multi-armed bandit over (pruning ratio, LoRA rank) arms, and the reward
it learns from: pure Python, no Flower, no torch.

FedSpine (arXiv 2501.02438) picks each device's pruning ratio and LoRA rank online with
a UCB-family bandit on a smoothed reward; its code is not public. Stamen's bandit is
discounted UCB (Garivier & Moulines, 2011): an arm's statistics are sums discounted by
``gamma`` per pull, so a reward observed long ago counts less. That is the smoothing:
the reward a device earns drifts as the global model converges (loss improvements
shrink) and as other devices change arms (round times are relative). ``gamma = 1`` is
plain UCB1.

The reward (:func:`reward`) combines what the device's training achieved (relative
loss improvement) and what its round cost (its downlink + train + uplink time relative to
the median device's), both measured by the instrumentation layer.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Arm:
    ratio: float  # share of attention heads and MLP channels pruned
    rank: int  # LoRA rank

    def label(self) -> str:
        return f"p{self.ratio:g}-r{self.rank}"


def arm_grid(ratios: Sequence[float], ranks: Sequence[int]) -> list[Arm]:
    """Every (ratio, rank) pair, ratios outer."""
    return [Arm(float(p), int(r)) for p in ratios for r in ranks]


def reward(
    *, loss_before: float, loss_after: float, round_time_s: float, median_round_time_s: float, time_weight: float = 0.5
) -> float:
    """``improvement - time_weight * (relative time - 1)``, clipped to [-1, 1].

    improvement = (loss_before - loss_after) / loss_before, the share of its local loss a
    device removed this round, measured from the model it received, before any pruning
    (FedSpine: loss-reference), so that pruning damage is a cost, not a head start; relative time = its round time (downlink + train + uplink)
    over the median device's. A device as fast as the median pays nothing; one twice as
    slow pays ``time_weight``; a faster one earns a bonus."""
    if not (loss_before > 0 and math.isfinite(loss_after) and round_time_s > 0 and median_round_time_s > 0):
        raise ValueError(
            f"reward needs a positive loss_before, a finite loss_after and positive times; got "
            f"{loss_before}, {loss_after}, {round_time_s}, {median_round_time_s}"
        )
    improvement = (loss_before - loss_after) / loss_before
    value = improvement - time_weight * (round_time_s / median_round_time_s - 1.0)
    return max(-1.0, min(1.0, value))


class DiscountedUCB:
    """Discounted UCB over a fixed list of arms. Untried arms are tried first, in order;
    then the arm with the highest ``mean + c * sqrt(log(n) / N_arm)`` (discounted counts)
    is chosen, ties broken at random with ``seed``."""

    def __init__(self, num_arms: int, *, gamma: float = 0.95, exploration: float = 0.5, seed: int = 0) -> None:
        if num_arms < 1 or not 0.0 < gamma <= 1.0 or exploration < 0:
            raise ValueError(f"num_arms >= 1, 0 < gamma <= 1, exploration >= 0; got {num_arms}, {gamma}, {exploration}")
        self.gamma, self.exploration = gamma, exploration
        self.counts = [0.0] * num_arms  # discounted number of pulls
        self.sums = [0.0] * num_arms  # discounted sum of rewards
        self.pulls = [0] * num_arms  # undiscounted, for reports
        self.history: list[tuple[int, float]] = []  # (arm, reward) per update
        self._rng = random.Random(seed)

    def means(self) -> list[float]:
        return [s / c if c > 0 else math.nan for s, c in zip(self.sums, self.counts, strict=True)]

    def select(self) -> int:
        untried = [a for a, n in enumerate(self.pulls) if n == 0]
        if untried:
            return untried[0]
        total = sum(self.counts)
        scores = [
            s / c + self.exploration * math.sqrt(max(math.log(total), 0.0) / c) for s, c in zip(self.sums, self.counts, strict=True)
        ]
        best = max(scores)
        return self._rng.choice([a for a, v in enumerate(scores) if v >= best - 1e-12])

    def update(self, arm: int, value: float) -> None:
        if not 0 <= arm < len(self.counts) or not math.isfinite(value):
            raise ValueError(f"arm {arm} of {len(self.counts)}, reward {value}: not a valid update")
        self.counts = [c * self.gamma for c in self.counts]
        self.sums = [s * self.gamma for s in self.sums]
        self.counts[arm] += 1.0
        self.sums[arm] += value
        self.pulls[arm] += 1
        self.history.append((arm, float(value)))

    # --- persistence: the bandit's state goes into the run directory as JSON ----------------
    def to_dict(self) -> dict:
        return {
            "gamma": self.gamma,
            "exploration": self.exploration,
            "counts": self.counts,
            "sums": self.sums,
            "pulls": self.pulls,
            "history": self.history,
            "rng": list(self._rng.getstate()[1]) + [self._rng.getstate()[0], self._rng.getstate()[2]],
        }

    @classmethod
    def from_dict(cls, state: dict) -> DiscountedUCB:
        bandit = cls(len(state["counts"]), gamma=state["gamma"], exploration=state["exploration"])
        bandit.counts = [float(x) for x in state["counts"]]
        bandit.sums = [float(x) for x in state["sums"]]
        bandit.pulls = [int(x) for x in state["pulls"]]
        bandit.history = [(int(a), float(r)) for a, r in state["history"]]
        *internal, version, gauss = state["rng"]
        bandit._rng.setstate((version, tuple(internal), gauss))
        return bandit
