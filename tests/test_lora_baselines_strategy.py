"""FedIT, HetLoRA and FlexLoRA as Flower strategies: what each node receives, and the
global model they return, on tiny arrays through configure_train / aggregate_train."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from stamen import keys
from strategies import FedIT, FlexLoRA, HetLoRA
from strategies.lora_records import from_record, to_record

IN, OUT = 8, 6
MODULES = ("layer.q", "layer.v")


def global_state():
    rng = np.random.default_rng(0)
    return {
        **{m + ".weight": rng.normal(size=(OUT, IN)).astype(np.float32) for m in MODULES},
        "head.weight": np.zeros((2, IN), dtype=np.float32),
        "head.bias": np.zeros(2, dtype=np.float32),
    }


def reply(instruction, factors, n, *, alpha, rank):
    arrays = {"head.weight": np.ones((2, IN), np.float32), "head.bias": np.ones(2, np.float32)}
    for m, (a, b) in factors.items():
        arrays[m + keys.LORA_A], arrays[m + keys.LORA_B] = a.astype(np.float32), b.astype(np.float32)
    metrics = MetricRecord({keys.NUM_EXAMPLES: n, keys.TRAIN_LOSS: 1.0, keys.LORA_ALPHA: alpha, keys.LORA_RANK: rank})
    return Message(RecordDict({keys.ARRAYS: to_record(arrays), keys.METRICS: metrics}), reply_to=instruction)


def sent(message):
    arrays = from_record(message.content.array_records[keys.ARRAYS])
    init = {k[len(keys.INIT_PREFIX):]: v for k, v in arrays.items() if k.startswith(keys.INIT_PREFIX)}
    return arrays, init, message.content.config_records[keys.CONFIG]


def random_factors(rng, rank):
    return {m: (rng.normal(size=(rank, IN)), rng.normal(size=(OUT, rank))) for m in MODULES}


def test_fedit_round_trip(flower_identity, fake_grid):
    s = FedIT(node_ranks={1: 4, 2: 4}, default_rank=4, lora_alpha=8.0, min_nodes=1, seed=3)
    g = global_state()
    msgs = {m.metadata.dst_node_id: m for m in s.configure_train(1, to_record(g), ConfigRecord(), fake_grid([1, 2]))}
    (arr1, init1, cfg1), (_, init2, _) = sent(msgs[1]), sent(msgs[2])
    assert cfg1[keys.SYNC_MODE] == keys.SYNC_DENSE and "layer.q.weight" in arr1
    np.testing.assert_array_equal(init1["layer.q" + keys.LORA_A], init2["layer.q" + keys.LORA_A])  # one shared start
    assert not init1["layer.q" + keys.LORA_B].any()  # B = 0: the model starts as W0
    rng = np.random.default_rng(1)
    f1, f2 = random_factors(rng, 4), random_factors(rng, 4)
    new, _ = s.aggregate_train(1, [reply(msgs[1], f1, 10, alpha=8.0, rank=4), reply(msgs[2], f2, 30, alpha=8.0, rank=4)])
    new = from_record(new)
    for m in MODULES:
        a = 0.25 * f1[m][0] + 0.75 * f2[m][0]
        b = 0.25 * f1[m][1] + 0.75 * f2[m][1]
        np.testing.assert_allclose(new[m + ".weight"], g[m + ".weight"] + 2.0 * b @ a, rtol=1e-4, atol=1e-4)
    # round 2: W0 is held, only the head and the averaged adapter travel
    msgs2 = {m.metadata.dst_node_id: m for m in s.configure_train(2, to_record(new), ConfigRecord(), fake_grid([1, 2]))}
    arr, init, cfg = sent(msgs2[1])
    assert cfg[keys.SYNC_MODE] == keys.SYNC_CURRENT and "layer.q.weight" not in arr
    np.testing.assert_allclose(init["layer.q" + keys.LORA_A], 0.25 * f1["layer.q"][0] + 0.75 * f2["layer.q"][0], rtol=1e-5)


def test_fedit_refuses_mixed_ranks():
    with pytest.raises(ValueError, match="one LoRA rank"):
        FedIT(node_ranks={1: 4, 2: 8}, default_rank=4, lora_alpha=8.0)


def test_hetlora_truncates_pads_and_follows_pruning(flower_identity, fake_grid):
    s = HetLoRA(node_ranks={1: 2, 2: 4}, default_rank=4, lora_alpha=8.0, min_nodes=1, seed=0)
    g = global_state()
    msgs = {m.metadata.dst_node_id: m for m in s.configure_train(1, to_record(g), ConfigRecord(), fake_grid([1, 2]))}
    (_, init1, cfg1), (_, init2, cfg2) = sent(msgs[1]), sent(msgs[2])
    assert init1["layer.q" + keys.LORA_A].shape == (2, IN) and init2["layer.q" + keys.LORA_A].shape == (4, IN)
    np.testing.assert_array_equal(init1["layer.q" + keys.LORA_A], init2["layer.q" + keys.LORA_A][:2])  # a truncation
    assert cfg1[keys.LORA_ALPHA] / 2 == cfg2[keys.LORA_ALPHA] / 4 == 8.0 / 4  # one scaling, alpha / r_max
    assert cfg1[keys.TAIL_PENALTY] > 0 and 0 < cfg1[keys.TAIL_FRACTION] < 1
    rng = np.random.default_rng(2)
    f1 = random_factors(rng, 2)
    f2 = random_factors(rng, 3)  # node 2 pruned 4 -> 3 and says so
    new, metrics = s.aggregate_train(1, [reply(msgs[1], f1, 10, alpha=4.0, rank=2), reply(msgs[2], f2, 10, alpha=6.0, rank=3)])
    assert metrics["num-clients"] == 2 and s.rank_of(2) == 3
    new = from_record(new)
    a, b = s.adapter["layer.q"]
    assert a.shape == (4, IN)
    np.testing.assert_allclose(new["layer.q.weight"], g["layer.q.weight"] + 2.0 * b @ a, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(a[3], init2["layer.q" + keys.LORA_A][3])  # nobody trained component 3: kept


def test_hetlora_rejects_a_rank_above_the_assigned_one(flower_identity, fake_grid):
    s = HetLoRA(node_ranks={1: 2, 2: 4}, default_rank=4, lora_alpha=8.0, min_nodes=1)
    msgs = {m.metadata.dst_node_id: m for m in s.configure_train(1, to_record(global_state()), ConfigRecord(), fake_grid([1, 2]))}
    rng = np.random.default_rng(0)
    ok = reply(msgs[2], random_factors(rng, 4), 10, alpha=8.0, rank=4)
    too_big = reply(msgs[1], random_factors(rng, 3), 10, alpha=6.0, rank=3)  # node 1 was given rank 2
    _, metrics = s.aggregate_train(1, [ok, too_big])
    assert metrics["num-clients"] == 1 and "lora-rank" in s.rounds[-1].dropped[1]


def test_flexlora_sends_each_node_its_svd_truncation(flower_identity, fake_grid):
    s = FlexLoRA(node_ranks={1: 2, 2: 4}, default_rank=4, lora_alpha=8.0, min_nodes=1)
    g = global_state()
    msgs = {m.metadata.dst_node_id: m for m in s.configure_train(1, to_record(g), ConfigRecord(), fake_grid([1, 2]))}
    assert sent(msgs[1])[1] == {}  # round 1: nothing to redistribute, a fresh LoRA
    rng = np.random.default_rng(4)
    f1, f2 = random_factors(rng, 2), random_factors(rng, 4)
    new, _ = s.aggregate_train(1, [reply(msgs[1], f1, 10, alpha=8.0, rank=2), reply(msgs[2], f2, 30, alpha=8.0, rank=4)])
    new = from_record(new)
    delta = {m: 0.25 * 4.0 * f1[m][1] @ f1[m][0] + 0.75 * 2.0 * f2[m][1] @ f2[m][0] for m in MODULES}
    for m in MODULES:
        np.testing.assert_allclose(new[m + ".weight"], g[m + ".weight"] + delta[m], rtol=1e-4, atol=1e-4)
    msgs2 = {m.metadata.dst_node_id: m for m in s.configure_train(2, to_record(new), ConfigRecord(), fake_grid([1, 2]))}
    for node, rank in ((1, 2), (2, 4)):
        _, init, _ = sent(msgs2[node])
        a, b = init["layer.q" + keys.LORA_A], init["layer.q" + keys.LORA_B]
        assert a.shape == (rank, IN) and b.shape == (OUT, rank)
        u, sv, vt = np.linalg.svd(delta["layer.q"])
        best = (u[:, :rank] * sv[:rank]) @ vt[:rank]
        np.testing.assert_allclose((8.0 / rank) * b @ a, best, rtol=1e-3, atol=1e-3)
    # node 2's rank 4 is below the delta's rank 6: its truncation is the best rank-4 one, not exact
    assert np.linalg.matrix_rank(delta["layer.q"]) == 6
