"""Central DP (strategies/central_dp.py): each node's update is clipped where the wrapped
strategy averages (FLoRA: the products s B A; FedIT: the factors' change), nodes weigh the
same, and the noise lands in what the nodes receive next."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from ml.privacy import Ledger
from stamen import keys
from strategies.central_dp import CentralDP, clip_factor, clip_reply, norm_of, product_change, product_update
from strategies.fedit import FedIT
from strategies.flora import FLoRA
from strategies.lora_records import from_record, to_record


def test_clip_factor():
    assert clip_factor(0.5, 1.0) == 1.0
    assert clip_factor(4.0, 1.0) == 0.25


def test_product_space_clipping_scales_b_and_the_head_change():
    # one module: s B A = 2 * [[1],[0]] @ [[3, 4]] = [[6, 8], [0, 0]], norm 10; head change [0, 0]
    arrays = {"m" + keys.LORA_A: np.array([[3.0, 4.0]]), "m" + keys.LORA_B: np.array([[1.0], [0.0]]), "head.bias": np.array([1.0, 1.0])}
    head_now = {"head.bias": np.array([1.0, 1.0])}
    assert norm_of(product_update(arrays, 2.0, head_now)) == pytest.approx(10.0)
    clipped, norm = clip_reply(arrays, space="product", scaling=2.0, head_now=head_now, sent={}, clipping_norm=5.0)
    assert norm == pytest.approx(10.0)
    np.testing.assert_allclose(clipped["m" + keys.LORA_B], [[0.5], [0.0]])  # the product halves: norm 5
    np.testing.assert_allclose(clipped["m" + keys.LORA_A], arrays["m" + keys.LORA_A])
    assert norm_of(product_update(clipped, 2.0, head_now)) == pytest.approx(5.0)


def test_factor_space_clipping_scales_the_change_from_the_sent_adapter():
    sent = {keys.INIT_PREFIX + "m" + keys.LORA_A: np.array([[1.0, 1.0]]), keys.INIT_PREFIX + "m" + keys.LORA_B: np.array([[0.0], [0.0]])}
    arrays = {"m" + keys.LORA_A: np.array([[4.0, 5.0]]), "m" + keys.LORA_B: np.array([[0.0], [0.0]]), "head.bias": np.array([2.0])}
    head_now = {"head.bias": np.array([2.0])}
    clipped, norm = clip_reply(arrays, space="factors", scaling=1.0, head_now=head_now, sent=sent, clipping_norm=1.0)
    assert norm == pytest.approx(5.0)  # the change of A is (3, 4)
    np.testing.assert_allclose(clipped["m" + keys.LORA_A], [[1.6, 1.8]])  # 1 + (3, 4) / 5
    clipped, _ = clip_reply(arrays, space="factors", scaling=1.0, head_now=head_now, sent=sent, clipping_norm=10.0)
    np.testing.assert_allclose(clipped["m" + keys.LORA_A], arrays["m" + keys.LORA_A])  # within the norm: unchanged


IN, OUT = 40, 30


def global_state():
    rng = np.random.default_rng(0)
    return {"layer.q.weight": rng.normal(size=(OUT, IN)).astype(np.float64), "head.weight": np.zeros((2, IN)), "head.bias": np.zeros(2)}


def reply(instruction, rank, n, seed, scale=10.0):
    rng = np.random.default_rng(seed)
    arrays = {
        "layer.q" + keys.LORA_A: scale * rng.normal(size=(rank, IN)),
        "layer.q" + keys.LORA_B: scale * rng.normal(size=(OUT, rank)),
        "head.weight": scale * np.ones((2, IN)),
        "head.bias": scale * np.ones(2),
    }
    metrics = MetricRecord({keys.NUM_EXAMPLES: n, keys.TRAIN_LOSS: 1.0, keys.LORA_ALPHA: 4.0, keys.LORA_RANK: rank})
    return Message(RecordDict({keys.ARRAYS: to_record(arrays), keys.METRICS: metrics}), reply_to=instruction), arrays


def flora_round(flower_identity, fake_grid, noise_multiplier):
    inner = FLoRA(node_ranks={1: 2, 2: 4}, default_rank=2, lora_alpha=4.0, min_nodes=1)
    dp = CentralDP(inner, noise_multiplier=noise_multiplier, clipping_norm=1.0, delta=1e-5)
    g = global_state()
    msgs = {m.metadata.dst_node_id: m for m in dp.configure_train(1, to_record(g), ConfigRecord(), fake_grid([1, 2]))}
    (r1, a1), (r2, a2) = reply(msgs[1], 2, 10, 1), reply(msgs[2], 4, 90, 2)
    new, metrics = dp.aggregate_train(1, [r1, r2])
    # what the aggregate must be without noise: the mean (equal weights) of the clipped products
    expected = g["layer.q.weight"].copy()
    for a, rank in ((a1, 2), (a2, 4)):
        clipped, _ = clip_reply(a, space="product", scaling=4.0 / rank, head_now={k: g[k] for k in ("head.weight", "head.bias")}, sent={}, clipping_norm=1.0)
        expected += 0.5 * (4.0 / rank) * clipped["layer.q" + keys.LORA_B] @ clipped["layer.q" + keys.LORA_A]
    return dp, g, from_record(new), expected, metrics


def test_flora_under_central_dp_is_the_equal_weight_mean_of_clipped_products_plus_noise(flower_identity, fake_grid):
    _, _, quiet, expected, _ = flora_round(flower_identity, fake_grid, 1e-12)
    np.testing.assert_allclose(quiet["layer.q.weight"], expected, atol=1e-9)  # example counts 10 / 90 were ignored

    dp, g, noisy, expected, metrics = flora_round(flower_identity, fake_grid, 1.0)
    noise = noisy["layer.q.weight"] - expected
    assert noise.std() == pytest.approx(1.0 * 1.0 / 2, rel=0.1)  # z C / m over 1,200 entries (m = 2 asked, both replied)
    assert metrics["dp-epsilon"] == pytest.approx(dp.epsilon()) and dp.releases == 1
    assert [r["status"] for r in dp.privacy_log] == ["central"]
    # the noise is not in the stacked factors: next round the nodes get dense weights
    msgs = list(dp.configure_train(2, to_record(noisy), ConfigRecord(), fake_grid([1, 2])))
    assert {m.content.config_records[keys.CONFIG][keys.SYNC_MODE] for m in msgs} == {keys.SYNC_DENSE}


def test_fedit_under_central_dp_noises_the_adapter_the_nodes_receive(flower_identity, fake_grid):
    inner = FedIT(node_ranks={1: 2, 2: 2}, default_rank=2, lora_alpha=4.0, min_nodes=1)
    dp = CentralDP(inner, noise_multiplier=1.0, clipping_norm=1.0, delta=1e-5)
    dp.rng = np.random.default_rng(0)  # this test reads a std off 16 entries: pinned here, never in a run
    msgs = {m.metadata.dst_node_id: m for m in dp.configure_train(1, to_record(global_state()), ConfigRecord(), fake_grid([1, 2]))}
    sent = from_record(msgs[1].content.array_records[keys.ARRAYS])
    (r1, _), (r2, _) = reply(msgs[1], 2, 10, 1), reply(msgs[2], 2, 90, 2)
    dp.aggregate_train(1, [r1, r2])
    a_global = inner.adapter["layer.q"][0]
    change = a_global - sent[keys.INIT_PREFIX + "layer.q" + keys.LORA_A]
    # each clipped change has norm <= 1, so their mean is small next to the noise (std 0.5)
    assert change.std() == pytest.approx(0.5, rel=0.25)
    msgs2 = list(dp.configure_train(2, to_record(global_state()), ConfigRecord(), fake_grid([1])))
    np.testing.assert_allclose(from_record(msgs2[0].content.array_records[keys.ARRAYS])[keys.INIT_PREFIX + "layer.q" + keys.LORA_A], a_global)


def test_central_dp_refuses_a_strategy_it_cannot_bound():
    from strategies.hetlora import HetLoRA

    with pytest.raises(ValueError, match="does not support central DP"):
        CentralDP(HetLoRA(node_ranks={}, default_rank=2, lora_alpha=4.0), noise_multiplier=1.0, clipping_norm=1.0, delta=1e-5)


# --- FlexLoRA: the change of s B A from the truncation each node was sent --------------


def factors(a, b):
    return {"m" + keys.LORA_A: np.array(a, float), "m" + keys.LORA_B: np.array(b, float)}


def test_flexlora_clipped_delta_is_the_mean_of_sent_plus_scaled_change():
    from strategies.flexlora import clipped_delta
    from strategies.lora_records import ClientLoRA

    # node 1 was sent T = [[1, 0], [0, 0]] and replies 3x that: change [[2, 0], [0, 0]], halved
    # node 2 started fresh (T = 0) and replies [[0, 0], [0, 2]], kept whole
    one = ClientLoRA({"m": (np.array([[1.0, 0.0]]), np.array([[3.0], [0.0]]))}, num_examples=10, scaling=1.0, node_id=1)
    two = ClientLoRA({"m": (np.array([[0.0, 1.0]]), np.array([[0.0], [2.0]]))}, num_examples=90, scaling=1.0, node_id=2)
    starts = {1: {"m": (np.array([[1.0, 0.0]]), np.array([[1.0], [0.0]]))}}
    delta = clipped_delta([one, two], starts, {1: 0.5, 2: 1.0})
    np.testing.assert_allclose(delta["m"], [[1.0, 0.0], [0.0, 1.0]])  # ([[2, 0], [0, 0]] + [[0, 0], [0, 2]]) / 2


def test_product_change_is_measured_from_the_sent_adapter():
    sent = {keys.INIT_PREFIX + k: v for k, v in factors([[1.0, 0.0]], [[1.0], [0.0]]).items()}
    arrays = {**factors([[1.0, 0.0]], [[3.0], [0.0]]), "head.bias": np.array([1.0])}
    head_now = {"head.bias": np.array([1.0])}
    assert norm_of(product_change(arrays, sent, 2.0, head_now)) == pytest.approx(4.0)  # 2 * (3 - 1)
    assert norm_of(product_change(arrays, {}, 2.0, head_now)) == pytest.approx(6.0)  # fresh: the product itself
    clipped, norm = clip_reply(arrays, space="product-change", scaling=2.0, head_now=head_now, sent=sent, clipping_norm=1.0)
    assert norm == pytest.approx(4.0)
    np.testing.assert_array_equal(clipped["m" + keys.LORA_B], arrays["m" + keys.LORA_B])  # the strategy scales the change


def flexlora_reply(instruction, rank, n, change):
    """A node's reply: the factors it was sent (round 1: a fresh A, B = 0) with B moved."""
    sent = from_record(instruction.content.array_records[keys.ARRAYS])
    a0 = sent.get(keys.INIT_PREFIX + "layer.q" + keys.LORA_A)
    b0 = sent.get(keys.INIT_PREFIX + "layer.q" + keys.LORA_B)
    rng = np.random.default_rng(rank * 1000 + n)
    a = a0 if a0 is not None else rng.normal(size=(rank, IN)) / np.sqrt(IN)
    b = (b0 if b0 is not None else np.zeros((OUT, rank))) + change * rng.normal(size=(OUT, rank))
    arrays = {"layer.q" + keys.LORA_A: a, "layer.q" + keys.LORA_B: b, "head.weight": np.ones((2, IN)), "head.bias": np.ones(2)}
    metrics = MetricRecord({keys.NUM_EXAMPLES: n, keys.TRAIN_LOSS: 1.0, keys.LORA_ALPHA: 4.0, keys.LORA_RANK: rank})
    return Message(RecordDict({keys.ARRAYS: to_record(arrays), keys.METRICS: metrics}), reply_to=instruction), arrays, sent


def flexlora_rounds(fake_grid, noise_multiplier, rounds, change=5.0, absent=None):
    """``absent``: {round: node} whose reply does not come; it counts as its T_k."""
    from strategies.flexlora import FlexLoRA

    inner = FlexLoRA(node_ranks={1: 2, 2: 4}, default_rank=2, lora_alpha=4.0, min_nodes=1)
    dp = CentralDP(inner, noise_multiplier=noise_multiplier, clipping_norm=1.0, delta=1e-5)
    g = global_state()
    w0 = g["layer.q.weight"].copy()
    history = []
    for rnd in range(1, rounds + 1):
        msgs = {m.metadata.dst_node_id: m for m in dp.configure_train(rnd, to_record(g), ConfigRecord(), fake_grid([1, 2]))}
        out = [flexlora_reply(msgs[node], rank, n, change) for node, rank, n in ((1, 2, 10), (2, 4, 90))]
        head_now = {k: g[k] for k in ("head.weight", "head.bias")}
        expected = w0.copy()  # W0 + the equal-weight mean of T_k + c_k (s B A - T_k)
        missing = (absent or {}).get(rnd)
        for (_, arrays, sent), node, rank in zip(out, (1, 2), (2, 4), strict=True):
            s = 4.0 / rank
            change_k = product_change(arrays, sent, s, head_now)
            c = 0.0 if node == missing else clip_factor(norm_of(change_k), 1.0)
            a0, b0 = (sent.get(keys.INIT_PREFIX + "layer.q" + x) for x in (keys.LORA_A, keys.LORA_B))
            t = 0.0 if a0 is None else s * b0 @ a0  # round 1: a fresh LoRA
            expected += 0.5 * (t + c * change_k[0])  # 1 / m, m = 2 asked, whoever replied
        new, metrics = dp.aggregate_train(rnd, [r for (r, _, _), node in zip(out, (1, 2), strict=True) if node != missing])
        g = from_record(new)
        history.append((g, expected, metrics, msgs))
    return dp, inner, w0, history



def test_flexlora_under_central_dp_without_noise_is_the_mean_of_clipped_changes(flower_identity, fake_grid):
    dp, inner, w0, history = flexlora_rounds(fake_grid, 1e-12, rounds=6)
    for g, expected, _, _ in history:
        np.testing.assert_allclose(g["layer.q.weight"], expected, atol=1e-6)  # example counts 10 / 90 ignored
    # each round moves the delta by at most C = 1 (every change here is clipped); clipping
    # the products themselves instead would hold the delta's norm at 1 for ever
    norms = [np.linalg.norm(g["layer.q.weight"] - w0) for g, _, _, _ in history]
    assert norms[0] <= 1.0 + 1e-6 and norms[-1] > 2.0  # 0.71 ... 2.72 over 6 rounds
    assert all(b - a <= 1.0 + 1e-6 for a, b in zip([0.0] + norms, norms, strict=False))


def test_flexlora_under_central_dp_counts_a_silent_node_as_the_truncation_it_was_sent(flower_identity, fake_grid):
    """Round 2, node 2 (rank 4) does not reply: the delta is (T_1 + c_1 change_1 + T_2) / 2.
    Averaging over the replies alone would give T_1 + c_1 change_1, which moves with the
    silent node's presence by far more than C / m."""
    _, inner, _, history = flexlora_rounds(fake_grid, 1e-12, rounds=3, absent={2: 2})
    for g, expected, _, _ in history:
        np.testing.assert_allclose(g["layer.q.weight"], expected, atol=1e-6)
    assert history[1][2]["num-clients"] == 1 and "no reply" in inner.rounds[1].dropped[2]


def test_flexlora_under_central_dp_noises_the_dense_delta_before_the_svd(flower_identity, fake_grid):
    dp, inner, w0, history = flexlora_rounds(fake_grid, 1.0, rounds=2)
    (g1, expected1, metrics1, _), (_, _, _, msgs2) = history
    noise = g1["layer.q.weight"] - expected1
    assert noise.std() == pytest.approx(1.0 * 1.0 / 2, rel=0.1)  # z C / m over 1,200 entries (m = 2 asked, both replied)
    assert metrics1["dp-epsilon"] == pytest.approx(Ledger([(1.0, 1.0, 1)]).epsilon(1e-5))  # one Gaussian release
    # what node 1 (rank 2) started from in round 2: the rank-2 truncation of the noised delta
    sent = from_record(msgs2[1].content.array_records[keys.ARRAYS])
    start = 2.0 * sent[keys.INIT_PREFIX + "layer.q" + keys.LORA_B].astype(np.float64) @ sent[keys.INIT_PREFIX + "layer.q" + keys.LORA_A]
    u, s, vt = np.linalg.svd(g1["layer.q.weight"] - w0)
    np.testing.assert_allclose(start, (u[:, :2] * s[:2]) @ vt[:2], atol=1e-4)


def test_a_reply_central_dp_cannot_clip_is_dropped_not_aggregated_unclipped(flower_identity, fake_grid):
    inner = FLoRA(node_ranks={1: 2, 2: 2}, default_rank=2, lora_alpha=4.0, min_nodes=1)
    dp = CentralDP(inner, noise_multiplier=1e-12, clipping_norm=1.0, delta=1e-5)
    msgs = {m.metadata.dst_node_id: m for m in dp.configure_train(1, to_record(global_state()), ConfigRecord(), fake_grid([1, 2]))}
    (r1, _), (r2, _) = reply(msgs[1], 2, 10, 1), reply(msgs[2], 2, 90, 2)
    del r2.content.metric_records[keys.METRICS][keys.LORA_RANK]  # no rank: its scaling, so its norm, is unknown
    _, metrics = dp.aggregate_train(1, [r1, r2])
    assert metrics["num-clients"] == 1
    assert "central DP cannot clip" in inner.rounds[-1].dropped[2]


def test_central_dp_noise_cannot_be_replayed_from_the_run_config(flower_identity, fake_grid, run_config):
    """Every node holds the run config, and z, C and n are public: noise drawn from a
    configured seed could be regenerated and subtracted. It comes from OS entropy."""
    _, _, first, expected, _ = flora_round(flower_identity, fake_grid, 1.0)
    _, _, second, expected_again, _ = flora_round(flower_identity, fake_grid, 1.0)
    np.testing.assert_allclose(expected, expected_again)  # the same config, the same inputs
    noise = first["layer.q.weight"] - expected
    assert np.abs(noise - (second["layer.q.weight"] - expected_again)).max() > 0.1  # yet other noise
    std = 1.0 * 1.0 / 2  # z C / n: public
    seeds = {v for v in run_config.values() if isinstance(v, int) and not isinstance(v, bool) and v >= 0} | set(range(1000))
    assert run_config["train.seed"] in seeds
    for seed in sorted(seeds):  # an attacker's guesses: every integer of the run config, and 0..999
        guess = np.random.default_rng(seed).normal(0.0, std, noise.shape).astype(noise.dtype)
        assert np.abs(guess - noise).max() > 0.1, f"the noise is replayed from seed {seed}"


def test_a_reply_that_misreports_its_rank_is_dropped_not_clipped_at_another_scaling(flower_identity, fake_grid, caplog):
    """Rank-2 factors reported as rank 1000 would be clipped at s = 4/1000 and aggregated
    at s = 4/2, 500x the bound; the metric must agree with the factors and the assignment."""
    import logging

    inner = FLoRA(node_ranks={1: 2, 2: 2}, default_rank=2, lora_alpha=4.0, min_nodes=1)
    dp = CentralDP(inner, noise_multiplier=1e-12, clipping_norm=1.0, delta=1e-5)
    g = global_state()
    msgs = {m.metadata.dst_node_id: m for m in dp.configure_train(1, to_record(g), ConfigRecord(), fake_grid([1, 2]))}
    (honest, a1), (liar, _) = reply(msgs[1], 2, 10, 1), reply(msgs[2], 2, 90, 2, scale=50.0)
    liar.content.metric_records[keys.METRICS][keys.LORA_RANK] = 1000
    with caplog.at_level(logging.WARNING):
        new, metrics = dp.aggregate_train(1, [honest, liar])
    assert metrics["num-clients"] == 1 and "assigned rank 2" in inner.rounds[-1].dropped[2]
    assert "node 2" in caplog.text
    head_now = {k: g[k] for k in ("head.weight", "head.bias")}
    clipped, _ = clip_reply(a1, space="product", scaling=2.0, head_now=head_now, sent={}, clipping_norm=1.0)
    moved = from_record(new)["layer.q.weight"] - g["layer.q.weight"]
    # the honest node alone at its scaling 4/2, weighted 1 of the cohort's 2 (the dropped
    # node counts as no change): within the bound C / m
    np.testing.assert_allclose(moved, 0.5 * 2.0 * clipped["layer.q" + keys.LORA_B] @ clipped["layer.q" + keys.LORA_A], atol=1e-6)
    assert np.linalg.norm(moved) <= 0.5 + 1e-6


@pytest.mark.parametrize("reported", [1000, 1, 2.0, None])
def test_lora_strategies_refuse_a_rank_metric_that_disagrees_with_the_assignment(reported, flower_identity, fake_grid):
    for cls in (FLoRA, FedIT):
        s = cls(node_ranks={1: 2, 2: 2}, default_rank=2, lora_alpha=4.0, min_nodes=1)
        msgs = {m.metadata.dst_node_id: m for m in s.configure_train(1, to_record(global_state()), ConfigRecord(), fake_grid([1, 2]))}
        (ok, _), (bad, _) = reply(msgs[1], 2, 10, 1), reply(msgs[2], 2, 90, 2)
        if reported is None:
            del bad.content.metric_records[keys.METRICS][keys.LORA_RANK]
        else:
            bad.content.metric_records[keys.METRICS][keys.LORA_RANK] = reported
        _, metrics = s.aggregate_train(1, [ok, bad])
        assert metrics["num-clients"] == 1 and keys.LORA_RANK in s.rounds[-1].dropped[2], cls.__name__


# --- the neighbouring relation: add/remove one node within the cohort (fixed denominator) --


def aligned_replies(msgs, signs):
    """Replies of rank 2 whose clipped updates are +-u for one vector u of norm C = 1."""
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(2, IN)), rng.normal(size=(OUT, 2))
    out = {}
    for node, sign in signs.items():
        arrays = {"layer.q" + keys.LORA_A: 10 * a, "layer.q" + keys.LORA_B: sign * 10 * b,
                  "head.weight": np.zeros((2, IN)), "head.bias": np.zeros(2)}
        metrics = MetricRecord({keys.NUM_EXAMPLES: 5, keys.TRAIN_LOSS: 1.0, keys.LORA_ALPHA: 4.0, keys.LORA_RANK: 2})
        out[node] = Message(RecordDict({keys.ARRAYS: to_record(arrays), keys.METRICS: metrics}), reply_to=msgs[node])
    return out


def release(fake_grid, repliers, noise_multiplier=1e-12):
    """One FLoRA round under central DP with nodes 1, 2, 3 asked and ``repliers`` replying
    (node 3's update points the other way); the released weights minus the global ones."""
    inner = FLoRA(node_ranks={}, default_rank=2, lora_alpha=4.0, min_nodes=1)
    dp = CentralDP(inner, noise_multiplier=noise_multiplier, clipping_norm=1.0, delta=1e-5)
    g = global_state()
    msgs = {m.metadata.dst_node_id: m for m in dp.configure_train(1, to_record(g), ConfigRecord(), fake_grid([1, 2, 3]))}
    replies = aligned_replies(msgs, {1: 1.0, 2: 1.0, 3: -1.0})
    new, metrics = dp.aggregate_train(1, [replies[n] for n in repliers])
    return from_record(new)["layer.q.weight"] - g["layer.q.weight"], metrics, dp


def test_one_node_moves_the_central_dp_release_by_at_most_c_over_the_cohort(flower_identity, fake_grid):
    """Cohort m = 3, clipped updates u, u, -u (norm C = 1). With node 3 present the release
    moves by u / 3, without it by 2u / 3: a difference of C / m. Dividing by the replies
    instead (u / 3 against u / 2 + u / 2 = u) differs by 2C / 3, twice what the noise covers."""
    with_3, metrics, _ = release(fake_grid, [1, 2, 3])
    without_3, metrics_without, _ = release(fake_grid, [1, 2])
    assert metrics["num-clients"] == 3 and metrics_without["num-clients"] == 2
    assert np.linalg.norm(with_3) == pytest.approx(1 / 3, rel=1e-6)  # the product part of u is all of it: the heads stay
    assert np.linalg.norm(with_3 - without_3) == pytest.approx(1 / 3, rel=1e-6)  # C / m, not 2C / 3


def test_the_central_dp_noise_is_scaled_to_the_cohort_not_to_the_replies(flower_identity, fake_grid):
    moved, _, _ = release(fake_grid, [1, 2], noise_multiplier=1.0)
    quiet, _, _ = release(fake_grid, [1, 2])
    noise = moved - quiet
    assert noise.std() == pytest.approx(1.0 * 1.0 / 3, rel=0.1)  # z C / m over 1,200 entries, m = 3 asked (2 replied)


def test_a_round_without_a_valid_reply_still_releases_the_noised_model(flower_identity, fake_grid):
    """Releasing nothing when no reply is valid would tell one node's presence apart from
    its absence for certain; the mechanism releases base + noise and accounts for it."""
    moved, metrics, dp = release(fake_grid, [], noise_multiplier=1.0)
    assert metrics["num-clients"] == 0 and dp.releases == 1
    assert moved.std() == pytest.approx(1.0 / 3, rel=0.1)  # only the noise moved it


def test_central_dp_epsilon_is_the_gaussian_mechanism_composed_checked_by_hand():
    """n = 10 nodes, z = 1, 3 releases, delta 1e-5 (the audit's example). Under add/remove
    with the fixed denominator each release is a Gaussian mechanism of sensitivity C / m
    and std z C / m: RDP alpha / (2 z^2) per release, composed by adding, converted to
    (epsilon, delta) with the formula Opacus uses (Balle et al. 2020), minimised over its orders."""
    import math

    z, releases, delta = 1.0, 3, 1e-5
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    by_hand = min(
        releases * a / (2 * z**2) - (math.log(delta) + math.log(a)) / (a - 1) + math.log((a - 1) / a) for a in orders
    )
    dp = CentralDP(FLoRA(node_ranks={}, default_rank=2, lora_alpha=4.0), noise_multiplier=z, clipping_norm=1.0, delta=delta)
    dp.releases = releases
    assert dp.epsilon() == pytest.approx(by_hand, rel=1e-6)
    assert by_hand == pytest.approx(9.0, abs=0.1)
    # dividing by the replies, the sensitivity is about 2C / (n + 1) against noise z C / n:
    # an effective multiplier of z (n + 1) / (2n) = 0.55, and epsilon about twice as large
    z_eff = z * 11 / 20
    replies_epsilon = min(releases * a / (2 * z_eff**2) - (math.log(delta) + math.log(a)) / (a - 1) + math.log((a - 1) / a) for a in orders)
    assert replies_epsilon == pytest.approx(18.9, abs=0.3)
