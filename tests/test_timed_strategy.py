"""The aggregation-timing wrapper times any strategy without changing its results."""

import time

import numpy as np
from flwr.app import ConfigRecord, Error, Message

from measurements.aggregation import TimedStrategy
from strategies.flora import FLoRA
from strategies.lora_records import from_record, to_record
from tests.test_flora_strategy import global_state, good_reply


class SlowFLoRA(FLoRA):
    def aggregate_lora(self, *args):
        time.sleep(0.2)
        return super().aggregate_lora(*args)


def test_wrapper_times_and_counts_without_changing_the_result(flower_identity, fake_grid):
    seen = []
    plain = FLoRA(node_ranks={1: 2, 2: 4, 3: 2}, default_rank=2, lora_alpha=8.0, min_nodes=1)
    timed = TimedStrategy(
        SlowFLoRA(node_ranks={1: 2, 2: 4, 3: 2}, default_rank=2, lora_alpha=8.0, min_nodes=1), on_round=seen.append
    )
    results = []
    for strategy in (plain, timed):
        msgs = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, to_record(global_state()), ConfigRecord(), fake_grid([1, 2, 3]))}
        replies = [good_reply(msgs[1], rank=2, n=10, seed=1)[0], good_reply(msgs[2], rank=4, n=30, seed=2)[0]]
        replies.append(Message(Error(code=0, reason="boom"), reply_to=msgs[3]))
        results.append(from_record(strategy.aggregate_train(1, replies[:2] if strategy is plain else replies)[0]))
    for key in results[0]:
        np.testing.assert_array_equal(results[0][key], results[1][key])

    (timing,) = seen
    assert timing.server_round == 1
    assert 0.2 <= timing.aggregation_s < 5.0  # the 0.2 s sleep inside aggregation is seen
    assert timing.round_s >= timing.aggregation_s + timing.configure_s - 1e-6
    assert sorted(timing.sent) == [1, 2, 3] and sorted(timing.replied) == [1, 2, 3]
    assert timing.errors == [3] and timing.late == []
    assert timing.payload_down_bytes > 0


def test_silent_nodes_are_late(flower_identity, fake_grid):
    timed = TimedStrategy(FLoRA(node_ranks={}, default_rank=2, lora_alpha=8.0, min_nodes=1))
    msgs = list(timed.configure_train(1, to_record(global_state()), ConfigRecord(), fake_grid([5, 6])))
    reply, _ = good_reply(msgs[0], rank=2, n=10, seed=1)
    timed.aggregate_train(1, [reply])
    assert timed.timings[1].late == [msgs[1].metadata.dst_node_id]
