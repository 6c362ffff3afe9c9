"""FedSpine as a Flower strategy on tiny arrays: arms per node, pruned replies merged by the
masked rule, rewards from loss and round time, and the bandits' saved state."""

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from stamen import keys
from strategies import FedSpine
from strategies.bandit import Arm
from strategies.lora_records import from_record, to_record

OUT, IN = 4, 3


def global_state():
    return {"m.weight": np.zeros((OUT, IN), np.float32), "head.weight": np.zeros((2, IN), np.float32)}


def strategy(tmp_path=None, times=None, **kw):
    s = FedSpine(arms=[Arm(0.0, 2), Arm(0.5, 1)], node_ranks={}, default_rank=2, lora_alpha=2.0, min_nodes=2, **kw)
    if tmp_path is not None:
        class Run:
            path = tmp_path
            tables = {}

            def write_table(self, name, columns, rows):
                self.tables[name] = rows

        s.attach_run(Run(), (lambda r: times) if times is not None else None)
    return s


def reply(instruction, *, rows, rank, n, before=2.0, after=1.0, start=4.0, end=1.0, value=1.0):
    """``before`` / ``after``: loss-reference / loss-after (the reward's); ``start`` / ``end``:
    the training losses, reported only (by default a start that pruning damaged)."""
    a = np.full((rank, IN), value, np.float32)
    b = np.ones((len(rows), rank), np.float32)
    arrays = {
        "m.lora_A": a, "m.lora_B": b, "head.weight": np.ones((2, IN), np.float32),
        "kept.m.rows": np.asarray(rows, np.int64), "kept.m.cols": np.arange(IN, dtype=np.int64),
    }
    metrics = MetricRecord({keys.NUM_EXAMPLES: n, keys.TRAIN_LOSS: 1.0, keys.LORA_ALPHA: 2.0, keys.LORA_RANK: rank, keys.LOSS_START: start, keys.LOSS_END: end,
                            keys.LOSS_REFERENCE: before, keys.LOSS_AFTER: after})
    return Message(RecordDict({keys.ARRAYS: to_record(arrays), keys.METRICS: metrics}), reply_to=instruction)


def test_a_round_with_a_pruned_and_a_dense_node(flower_identity, fake_grid, tmp_path):
    s = strategy(tmp_path, times={1: 10.0, 2: 20.0})
    msgs = {m.metadata.dst_node_id: m for m in s.configure_train(1, to_record(global_state()), ConfigRecord(), fake_grid([1, 2]))}
    for m in msgs.values():  # untried arms first: both nodes start with arm 0
        cfg = m.content.config_records[keys.CONFIG]
        assert cfg[keys.PRUNE_RATIO] == 0.0 and cfg[keys.LORA_RANK] == 2 and cfg[keys.SYNC_MODE] == keys.SYNC_DENSE
    # node 1 kept rows 0..3 (dense), node 2 pretends it kept rows 0 and 2 only
    new, _ = s.aggregate_train(1, [reply(msgs[1], rows=[0, 1, 2, 3], rank=2, n=1), reply(msgs[2], rows=[0, 2], rank=2, n=1, value=3.0)])
    w = from_record(new)["m.weight"]
    # scaling alpha/r = 1; node 1's delta: B A = 2 everywhere; node 2's: 6 on rows 0 and 2
    np.testing.assert_allclose(w[[0, 2]], 4.0)  # (2 + 6) / 2
    np.testing.assert_allclose(w[[1, 3]], 2.0)  # node 1 alone
    # round 2 rewards round 1: improvement 0.5; node 2 twice the median time... of {10, 20}: 15
    s.configure_train(2, new, ConfigRecord(), fake_grid([1, 2]))
    rewards = {c["node_id"]: c["reward"] for c in s.choices if c["round"] == 1}
    assert rewards[1] == pytest.approx(0.5 - 0.5 * (10 / 15 - 1)) and rewards[2] == pytest.approx(0.5 - 0.5 * (20 / 15 - 1))
    assert {c["ratio"] for c in s.choices if c["round"] == 2} == {0.5}  # the untried arm next
    saved = json.loads((tmp_path / "bandit_state.json").read_text())
    assert saved["nodes"]["1"]["pulls"] == [1, 0]


def test_the_reward_does_not_pay_for_pruning_damage(flower_identity, fake_grid, tmp_path):
    """From round 2 a node prunes before its first step. Node 1 pruned hard: its training
    loss went 0.9 -> 0.6, from a damaged start; node 2 pruned nothing: 0.5 -> 0.45. Both
    received a global model whose loss on those batches is 0.5, and took equal times. The
    drop within the round would score node 1 0.33 and node 2 0.10, paying for the damage;
    against the model they received, node 1 made it worse (-0.2) and node 2 better (0.1)."""
    s = strategy(tmp_path, times={1: 1.0, 2: 1.0})
    msgs = {m.metadata.dst_node_id: m for m in s.configure_train(1, to_record(global_state()), ConfigRecord(), fake_grid([1, 2]))}
    s.aggregate_train(1, [
        reply(msgs[1], rows=[0, 1, 2, 3], rank=2, n=1, start=0.9, end=0.6, before=0.5, after=0.6),
        reply(msgs[2], rows=[0, 1, 2, 3], rank=2, n=1, start=0.5, end=0.45, before=0.5, after=0.45),
    ])
    s.configure_train(2, to_record(global_state()), ConfigRecord(), fake_grid([1, 2]))
    rewards = {c["node_id"]: c["reward"] for c in s.choices if c["round"] == 1}
    assert rewards[1] == pytest.approx(-0.2) and rewards[2] == pytest.approx(0.1)


def test_a_reply_with_bad_kept_indices_is_dropped(flower_identity, fake_grid):
    s = strategy()
    msgs = {m.metadata.dst_node_id: m for m in s.configure_train(1, to_record(global_state()), ConfigRecord(), fake_grid([1, 2]))}
    new, _ = s.aggregate_train(1, [reply(msgs[1], rows=[2, 1], rank=2, n=1), reply(msgs[2], rows=[0, 1, 2, 3], rank=2, n=1)])
    assert 1 in s.rounds[-1].dropped and "increase" in s.rounds[-1].dropped[1]
    np.testing.assert_allclose(from_record(new)["m.weight"], 2.0)


def test_the_bandits_resume_from_a_saved_state(flower_identity, fake_grid, tmp_path):
    s = strategy(tmp_path, times={1: 1.0, 2: 1.0})
    g = to_record(global_state())
    for rnd in (1, 2):
        msgs = {m.metadata.dst_node_id: m for m in s.configure_train(rnd, g, ConfigRecord(), fake_grid([1, 2]))}
        g, _ = s.aggregate_train(rnd, [reply(m, rows=[0, 1, 2, 3], rank=m.content.config_records[keys.CONFIG][keys.LORA_RANK], n=1) for m in msgs.values()])
    s.finish()
    resumed = FedSpine(arms=[Arm(0.0, 2), Arm(0.5, 1)], node_ranks={}, default_rank=2, lora_alpha=2.0, resume_from=tmp_path / "bandit_state.json")
    assert resumed.bandits[1].pulls == s.bandits[1].pulls == [1, 1]
    assert resumed.bandits[1].select() == s.bandits[1].select()
    with pytest.raises(ValueError, match="arms"):
        FedSpine(arms=[Arm(0.0, 2)], node_ranks={}, default_rank=2, lora_alpha=2.0, resume_from=tmp_path / "bandit_state.json")
