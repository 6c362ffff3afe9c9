"""The (pruning ratio, LoRA rank) bandit on synthetic arms with known rewards, its reward,
and its saved state."""

import json
import math
import random

import pytest

from strategies.bandit import Arm, DiscountedUCB, arm_grid, reward

MEANS = [0.2, 0.5, 0.35, 0.45]  # arm 1 is the best by 0.05


def play(bandit, rounds, seed=1):
    rng = random.Random(seed)
    regret, chosen = [], []
    for _ in range(rounds):
        arm = bandit.select()
        bandit.update(arm, MEANS[arm] + rng.gauss(0, 0.1))
        regret.append(max(MEANS) - MEANS[arm])
        chosen.append(arm)
    return regret, chosen


def test_regret_grows_sublinearly_and_the_best_arm_wins():
    regret, chosen = play(DiscountedUCB(len(MEANS), gamma=1.0, exploration=0.5, seed=0), 4000)
    first, second = sum(regret[:2000]), sum(regret[2000:])
    assert second < 0.5 * first  # the second half adds far less regret than the first
    assert sum(regret) < 0.05 * 4000 * 0.5  # far below always-wrong (0.05 .. 0.3 per pull)
    assert chosen[-1000:].count(1) > 900


def test_a_discounted_bandit_settles_too():
    """Discounting forgets, so on stationary arms its regret keeps growing (linearly, with a
    slope that shrinks as gamma -> 1): the price of following drifting rewards. It still
    spends most pulls on the best arm."""
    regret, chosen = play(DiscountedUCB(len(MEANS), gamma=0.999, exploration=0.5, seed=0), 4000)
    assert chosen[-1000:].count(1) > 750 and sum(regret[2000:]) < sum(regret[:2000])


def test_untried_arms_go_first_in_order():
    bandit = DiscountedUCB(3)
    order = []
    for _ in range(3):
        arm = bandit.select()
        order.append(arm)
        bandit.update(arm, 0.0)
    assert order == [0, 1, 2]


def test_discounting_follows_a_change():
    """A bandit with gamma < 1 moves to an arm that became best; plain UCB1 lags."""
    def run(gamma):
        bandit, rng = DiscountedUCB(2, gamma=gamma, exploration=0.3, seed=0), random.Random(3)
        late = []
        for t in range(1500):
            means = (0.6, 0.4) if t < 1000 else (0.3, 0.5)
            arm = bandit.select()
            bandit.update(arm, means[arm] + rng.gauss(0, 0.05))
            if t >= 1300:
                late.append(arm)
        return late.count(1) / len(late)

    assert run(0.98) > 0.9 and run(0.98) > run(1.0)


def test_state_round_trips_through_json():
    a = DiscountedUCB(4, gamma=0.9, seed=5)
    play(a, 30)
    b = DiscountedUCB.from_dict(json.loads(json.dumps(a.to_dict())))
    assert b.counts == pytest.approx(a.counts) and b.history == a.history
    for _ in range(20):  # the restored bandit makes the same choices, random ties included
        arm_a, arm_b = a.select(), b.select()
        assert arm_a == arm_b
        a.update(arm_a, 0.1)
        b.update(arm_b, 0.1)


def test_reward_by_hand():
    # half the loss removed, as fast as the median: 0.5
    assert reward(loss_before=2.0, loss_after=1.0, round_time_s=10.0, median_round_time_s=10.0) == pytest.approx(0.5)
    # same improvement, twice the median time, time weight 0.5: 0.5 - 0.5 * 1 = 0
    assert reward(loss_before=2.0, loss_after=1.0, round_time_s=20.0, median_round_time_s=10.0) == pytest.approx(0.0)
    # clipped
    assert reward(loss_before=1.0, loss_after=1.0, round_time_s=100.0, median_round_time_s=1.0) == -1.0
    with pytest.raises(ValueError):
        reward(loss_before=0.0, loss_after=1.0, round_time_s=1.0, median_round_time_s=1.0)
    with pytest.raises(ValueError):
        reward(loss_before=1.0, loss_after=math.nan, round_time_s=1.0, median_round_time_s=1.0)


def test_arm_grid():
    arms = arm_grid([0, 0.5], [4, 8])
    assert arms == [Arm(0.0, 4), Arm(0.0, 8), Arm(0.5, 4), Arm(0.5, 8)] and arms[3].label() == "p0.5-r8"
