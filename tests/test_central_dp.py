"""Central DP (strategies/central_dp.py): each node's update is clipped where the wrapped
strategy averages (FLoRA: the products s B A; FedIT: the factors' change), nodes weigh the
same, and the noise lands in what the nodes receive next."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from stamen import keys
from strategies.central_dp import CentralDP, clip_factor, clip_reply, norm_of, product_update
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
    dp = CentralDP(inner, noise_multiplier=noise_multiplier, clipping_norm=1.0, delta=1e-5, seed=0)
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
    assert noise.std() == pytest.approx(1.0 * 1.0 / 2, rel=0.1)  # z C / n over 1,200 entries
    assert metrics["dp-epsilon"] == pytest.approx(dp.epsilon()) and dp.releases == 1
    assert [r["status"] for r in dp.privacy_log] == ["central"]
    # the noise is not in the stacked factors: next round the nodes get dense weights
    msgs = list(dp.configure_train(2, to_record(noisy), ConfigRecord(), fake_grid([1, 2])))
    assert {m.content.config_records[keys.CONFIG][keys.SYNC_MODE] for m in msgs} == {keys.SYNC_DENSE}


def test_fedit_under_central_dp_noises_the_adapter_the_nodes_receive(flower_identity, fake_grid):
    inner = FedIT(node_ranks={1: 2, 2: 2}, default_rank=2, lora_alpha=4.0, min_nodes=1)
    dp = CentralDP(inner, noise_multiplier=1.0, clipping_norm=1.0, delta=1e-5, seed=0)
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
