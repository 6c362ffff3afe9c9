"""FLoRA as a Flower strategy: per-node messages, bad replies dropped, downlink forms."""

import logging

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

from stamen import keys
from strategies.flora import FLoRA
from strategies.lora_records import from_record, to_record

IN, OUT = 8, 6  # stacked rank-2 factors (2*14 numbers) are smaller than W (48)


def global_state():
    rng = np.random.default_rng(0)
    return {
        "layer.q.weight": rng.normal(size=(OUT, IN)).astype(np.float32),
        "layer.v.weight": rng.normal(size=(OUT, IN)).astype(np.float32),
        "head.weight": np.zeros((2, IN), dtype=np.float32),
        "head.bias": np.zeros(2, dtype=np.float32),
    }


def good_reply(instruction, rank, n, seed, head_value=1.0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for m in ("layer.q", "layer.v"):
        arrays[m + keys.LORA_A] = rng.normal(size=(rank, IN)).astype(np.float32)
        arrays[m + keys.LORA_B] = rng.normal(size=(OUT, rank)).astype(np.float32)
    arrays["head.weight"] = np.full((2, IN), head_value, dtype=np.float32)
    arrays["head.bias"] = np.full(2, head_value, dtype=np.float32)
    metrics = MetricRecord({keys.NUM_EXAMPLES: n, keys.TRAIN_LOSS: 1.0, keys.LORA_ALPHA: 8.0, keys.LORA_RANK: rank})
    return Message(RecordDict({keys.ARRAYS: to_record(arrays), keys.METRICS: metrics}), reply_to=instruction), arrays


@pytest.fixture()
def strategy():
    return FLoRA(node_ranks={1: 2, 2: 4, 3: 2, 4: 4, 5: 2}, default_rank=2, lora_alpha=8.0, min_nodes=1)


def test_each_node_gets_its_own_rank(flower_identity, fake_grid, strategy):
    messages = list(strategy.configure_train(1, to_record(global_state()), ConfigRecord(), fake_grid([1, 2])))
    by_node = {m.metadata.dst_node_id: m for m in messages}
    assert {n: int(m.content.config_records[keys.CONFIG][keys.LORA_RANK]) for n, m in by_node.items()} == {1: 2, 2: 4}
    assert all(m.content.config_records[keys.CONFIG][keys.SYNC_MODE] == keys.SYNC_DENSE for m in messages)


def test_bad_replies_are_dropped_and_the_rest_aggregated(flower_identity, fake_grid, strategy, caplog):
    g = global_state()
    msgs = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, to_record(g), ConfigRecord(), fake_grid([1, 2, 3, 4, 5]))}
    ok1, a1 = good_reply(msgs[1], rank=2, n=10, seed=1, head_value=1.0)
    ok2, a2 = good_reply(msgs[2], rank=4, n=30, seed=2, head_value=3.0)

    missing, arrays = good_reply(msgs[3], rank=2, n=10, seed=3)
    del arrays["layer.v" + keys.LORA_B]
    missing = Message(
        RecordDict({keys.ARRAYS: to_record(arrays), keys.METRICS: missing.content.metric_records[keys.METRICS]}),
        reply_to=msgs[3],
    )
    wrong_rank, _ = good_reply(msgs[4], rank=2, n=10, seed=4)  # node 4 was asked for rank 4
    wrong_rank.content.metric_records[keys.METRICS][keys.LORA_RANK] = 4  # and says it trained it
    nan_reply, arrays = good_reply(msgs[5], rank=2, n=10, seed=5)
    arrays["layer.q" + keys.LORA_A] = np.full((2, IN), np.nan, dtype=np.float32)
    nan_reply.content[keys.ARRAYS] = to_record(arrays)

    with caplog.at_level(logging.WARNING):
        new, metrics = strategy.aggregate_train(1, [ok1, ok2, missing, wrong_rank, nan_reply])
    text = caplog.text
    assert "dropping node 3 from round 1: invalid update: missing keys: layer.v.lora_B" in text
    assert "dropping node 4 from round 1: invalid update: layer.q: got A (2, 8)" in text and "(rank 4)" in text
    assert "dropping node 5 from round 1: invalid update: layer.q.lora_A: non-finite values" in text
    assert metrics["num-clients"] == 2 and metrics["dropped"] == 3 and metrics["global-rank"] == 6

    new = from_record(new)
    p1, p2 = 10 / 40, 30 / 40
    for m in ("layer.q", "layer.v"):
        expected = g[m + ".weight"] + p1 * (8.0 / 2) * a1[m + keys.LORA_B] @ a1[m + keys.LORA_A] + p2 * (
            8.0 / 4
        ) * a2[m + keys.LORA_B] @ a2[m + keys.LORA_A]
        np.testing.assert_allclose(new[m + ".weight"], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new["head.bias"], p1 * 1.0 + p2 * 3.0)


def test_error_and_silent_nodes_are_dropped_and_resynced(flower_identity, fake_grid, strategy):
    g = global_state()
    msgs = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, to_record(g), ConfigRecord(), fake_grid([1, 2, 3]))}
    ok, _ = good_reply(msgs[1], rank=2, n=10, seed=1)
    err = Message(Error(code=0, reason="boom"), reply_to=msgs[2])
    new, metrics = strategy.aggregate_train(1, [ok, err])  # node 3 never answers
    assert metrics["num-clients"] == 1 and metrics["dropped"] == 2
    assert strategy.rounds[-1].dropped[2] == "client error: boom"
    assert strategy.rounds[-1].dropped[3] == "no reply before the round timeout"

    # Round 2: node 1 holds version 0 and gets the stacked delta; 2 and 3 get dense weights.
    msgs2 = {m.metadata.dst_node_id: m for m in strategy.configure_train(2, new, ConfigRecord(), fake_grid([1, 2, 3]))}
    modes = {n: m.content.config_records[keys.CONFIG][keys.SYNC_MODE] for n, m in msgs2.items()}
    assert modes == {1: keys.SYNC_STACKED, 2: keys.SYNC_DENSE, 3: keys.SYNC_DENSE}
    stacked = from_record(msgs2[1].content.array_records[keys.ARRAYS])
    assert stacked["layer.q" + keys.LORA_A].shape == (2, IN)  # global rank of round 1


def test_no_valid_reply_keeps_the_model(flower_identity, fake_grid, strategy):
    msgs = list(strategy.configure_train(1, to_record(global_state()), ConfigRecord(), fake_grid([1])))
    err = Message(Error(code=0, reason="boom"), reply_to=msgs[0])
    assert strategy.aggregate_train(1, [err]) == (None, None)


def test_dense_is_sent_when_it_is_smaller_than_the_stack(flower_identity, fake_grid):
    # rank 4+4 = 8 stacked on 8x6 matrices: 8*(8+6) = 112 numbers > 48 dense
    strategy = FLoRA(node_ranks={1: 4, 2: 4}, default_rank=4, lora_alpha=8.0, min_nodes=1)
    msgs = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, to_record(global_state()), ConfigRecord(), fake_grid([1, 2]))}
    replies = [good_reply(msgs[n], rank=4, n=10, seed=n)[0] for n in (1, 2)]
    new, _ = strategy.aggregate_train(1, replies)
    msgs2 = list(strategy.configure_train(2, new, ConfigRecord(), fake_grid([1, 2])))
    assert {m.content.config_records[keys.CONFIG][keys.SYNC_MODE] for m in msgs2} == {keys.SYNC_DENSE}
    assert strategy.rounds[-1].downlink_bytes[1] == to_record(from_record(new)).count_bytes()
