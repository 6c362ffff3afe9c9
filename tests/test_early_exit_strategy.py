"""The early-exit strategies through configure_train / aggregate_train on tiny arrays:
what each depth receives, who trains, and the layer-wise global model."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from stamen import keys
from strategies import DepthFL, ExclusiveFL, InclusiveFL, ReeFL
from strategies.lora_records import from_record, to_record

# a 2-exit model: block 0 under exit 1, block 1 under exit 2; per-exit heads; embeddings shared
REQUIRED = {"emb": 1, "block0": 1, "block1": 2, "heads.0.w": 1, "heads.1.w": 2}


def global_state():
    return {k: np.full(2, float(i), dtype=np.float32) for i, k in enumerate(REQUIRED)}


def strategy(cls, **kw):
    return cls(node_exits={1: 1, 2: 2}, num_exits=2, required_exits=REQUIRED, distill_weight=1.0, distill_rampup_rounds=4, **kw)


def configure(s, fake_grid, server_round=1):
    return {m.metadata.dst_node_id: m for m in s.configure_train(server_round, to_record(global_state()), ConfigRecord(), fake_grid([1, 2]))}


def reply(instruction, value, n):
    arrays = {k: np.full_like(v, value) for k, v in from_record(instruction.content.array_records[keys.ARRAYS]).items()}
    metrics = MetricRecord({keys.NUM_EXAMPLES: n, keys.TRAIN_LOSS: 1.0})
    return Message(RecordDict({keys.ARRAYS: to_record(arrays), keys.METRICS: metrics}), reply_to=instruction)


def test_each_depth_receives_its_part_and_the_method(flower_identity, fake_grid):
    msgs = configure(strategy(ReeFL), fake_grid, server_round=2)
    shallow = from_record(msgs[1].content.array_records[keys.ARRAYS])
    deep = from_record(msgs[2].content.array_records[keys.ARRAYS])
    assert set(shallow) == {"emb", "block0", "heads.0.w"} and set(deep) == set(REQUIRED)
    cfg = msgs[1].content.config_records[keys.CONFIG]
    assert cfg[keys.MAX_EXIT] == 1 and cfg[keys.EXIT_KIND] == "ree" and cfg[keys.METHOD] == "reefl"
    assert cfg[keys.DISTILL_WEIGHT] == pytest.approx(0.5)  # round 2 of a 4-round ramp


def test_layerwise_round_trip(flower_identity, fake_grid):
    s = strategy(DepthFL)
    msgs = configure(s, fake_grid)
    new, metrics = s.aggregate_train(1, [reply(msgs[1], 10.0, 1), reply(msgs[2], 20.0, 3)])
    g = from_record(new)
    np.testing.assert_allclose(g["emb"], 17.5)  # (10 * 1 + 20 * 3) / 4
    np.testing.assert_allclose(g["block0"], 17.5)
    np.testing.assert_allclose(g["block1"], 20.0)  # the deep node alone
    np.testing.assert_allclose(g["heads.1.w"], 20.0)
    assert metrics["num-clients"] == 2


def test_a_bad_update_is_dropped_and_the_round_goes_on(flower_identity, fake_grid):
    s = strategy(ReeFL)
    msgs = configure(s, fake_grid)
    bad = reply(msgs[1], 10.0, 1)
    arrays = from_record(bad.content.array_records[keys.ARRAYS])
    arrays["block1"] = np.zeros(2, np.float32)  # a parameter a depth-1 node does not hold
    bad.content.array_records[keys.ARRAYS] = to_record(arrays)
    new, _ = s.aggregate_train(1, [bad, reply(msgs[2], 20.0, 3)])
    np.testing.assert_allclose(from_record(new)["emb"], 20.0)
    assert 1 in s.rounds[-1].dropped and "not asked for" in s.rounds[-1].dropped[1]


def test_exclusivefl_trains_only_full_depth_nodes(flower_identity, fake_grid):
    s = strategy(ExclusiveFL)
    msgs = configure(s, fake_grid)
    assert set(msgs) == {2} and s.rounds[-1].skipped == [1]


def test_inclusivefl_sends_only_the_deepest_head(flower_identity, fake_grid):
    msgs = configure(strategy(InclusiveFL), fake_grid)
    assert set(from_record(msgs[1].content.array_records[keys.ARRAYS])) == {"emb", "block0", "heads.0.w"}
    assert set(from_record(msgs[2].content.array_records[keys.ARRAYS])) == {"emb", "block0", "block1", "heads.1.w"}


def test_node_exits_are_validated():
    with pytest.raises(ValueError, match="max exit"):
        ReeFL(node_exits={1: 3}, num_exits=2, required_exits=REQUIRED)


def test_exits_from_profiles(run_config):
    from server_app.profiles import exits_from_profiles
    from stamen.config import StamenConfig

    ee = StamenConfig.from_run_config({**run_config, "early-exit.exit-by-partition": "1 2"}).early_exit
    profiles = {
        1: {"device-class": "cpu", "partition-id": 0},
        2: {"device-class": "cpu", "partition-id": 1},
        3: {"device-class": "cpu", "partition-id": 0, "max-exit": 4},  # node-config wins
    }
    assert exits_from_profiles(profiles, ee, 4) == ({1: 1, 2: 2, 3: 4}, {})
    # a node whose max-exit is out of range is left out, with the key named; the others go on
    exits, left_out = exits_from_profiles({**profiles, 4: {"max-exit": 5}, 5: {"max-exit": -1}}, ee, 4)
    assert exits == {1: 1, 2: 2, 3: 4} and set(left_out) == {4, 5}
    assert "node-config max-exit = 5: must be an integer in 1..4" in left_out[4]


def test_the_registries_agree():
    from stamen.config import EARLY_EXIT_STRATEGIES, LORA_STRATEGIES
    from strategies import STRATEGIES, EarlyExitStrategy, LoRAStrategy

    assert set(STRATEGIES) == set(LORA_STRATEGIES) | set(EARLY_EXIT_STRATEGIES)
    assert all(issubclass(STRATEGIES[n], EarlyExitStrategy) for n in EARLY_EXIT_STRATEGIES)
    assert all(issubclass(STRATEGIES[n], LoRAStrategy) for n in LORA_STRATEGIES)
