"""What fleet scale needs of the server: a round too few nodes served fails the run
(server_app/quorum.py), partitions that cannot be built are one clear error
(ml/data.py), and what grows per node without need does not (one downlink record per
distinct downlink, no global weights kept by simulated nodes)."""

import logging

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message

from server_app.quorum import Quorum, RoundFailedError, check_quorum, failure_summary
from stamen import keys
from stamen.config import ConfigError
from strategies.fedit import FedIT
from strategies.flora import FLoRA
from strategies.lora_records import to_record
from tests.test_flora_strategy import global_state, good_reply

# --- the quorum -----------------------------------------------------------------------------


def flora(min_nodes=1):
    return FLoRA(node_ranks={}, default_rank=2, lora_alpha=8.0, min_nodes=min_nodes)


def round_of(strategy, fake_grid, nodes, server_round=1):
    msgs = strategy.configure_train(server_round, to_record(global_state()), ConfigRecord(), fake_grid(nodes))
    return {m.metadata.dst_node_id: m for m in msgs}


def test_a_round_whose_every_reply_is_an_error_fails_naming_the_errors(flower_identity, fake_grid):
    wrapped = Quorum(flora(), min_replies=1)
    msgs = round_of(wrapped, fake_grid, [1, 2, 3])
    replies = [
        Message(Error(code=0, reason="Traceback ...\nConfigError: no data partition"), reply_to=msgs[1]),
        Message(Error(code=0, reason="Traceback ...\nConfigError: no data partition"), reply_to=msgs[2]),
    ]  # node 3 never answers
    with pytest.raises(RoundFailedError) as err:
        wrapped.aggregate_train(1, replies)
    text = str(err.value)
    assert "round 1: 0 of 3 nodes replied without an error" in text and "strategy.min-replies = 1" in text
    assert "2 nodes (1, 2): ConfigError: no data partition" in text  # the reason's last line, grouped
    assert "1 node (3): no reply before the round timeout" in text
    # the wrapped strategy booked the round before the run stopped: clients.csv names each drop
    assert wrapped.strategy.rounds[-1].dropped == {1: "client error: Traceback ...\nConfigError: no data partition",
                                                   2: "client error: Traceback ...\nConfigError: no data partition",
                                                   3: "no reply before the round timeout"}


def test_fewer_good_replies_than_the_minimum_fail_and_enough_pass(flower_identity, fake_grid):
    for needed, fails in ((2, True), (1, False)):
        wrapped = Quorum(flora(), min_replies=needed)
        msgs = round_of(wrapped, fake_grid, [1, 2, 3])
        ok, _ = good_reply(msgs[1], rank=2, n=10, seed=1)
        errs = [Message(Error(code=0, reason="boom"), reply_to=msgs[n]) for n in (2, 3)]
        if fails:
            with pytest.raises(RoundFailedError, match="1 of 3 nodes replied without an error, fewer than strategy.min-replies = 2"):
                wrapped.aggregate_train(1, [ok, *errs])
        else:
            new, metrics = wrapped.aggregate_train(1, [ok, *errs])
            assert new is not None and metrics["num-clients"] == 1


def test_a_refused_reply_is_a_reply(flower_identity, fake_grid):
    """An update the server's checks refuse (here: NaN) does not stop the run: the node
    worked, the check did its job, and a bad node must not be able to stop everyone."""
    wrapped = Quorum(flora(), min_replies=1)
    msgs = round_of(wrapped, fake_grid, [1])
    bad, arrays = good_reply(msgs[1], rank=2, n=10, seed=1)
    arrays["layer.q" + keys.LORA_A] = np.full_like(arrays["layer.q" + keys.LORA_A], np.nan)
    bad.content[keys.ARRAYS] = to_record(arrays)
    assert wrapped.aggregate_train(1, [bad]) == (None, None)  # refused, the model kept, the run goes on
    assert "non-finite" in wrapped.strategy.rounds[-1].dropped[1]


def test_a_round_without_participants_is_not_judged():
    check_quorum(3, sent=[], replies=[], min_replies=5)  # e.g. every node retired: nothing was asked


def test_the_summary_groups_reasons_most_frequent_first():
    errors = dict.fromkeys(range(10, 15), "out of memory") | {7: "boom"}
    assert failure_summary(errors, silent=[99], shown=2) == (
        "5 nodes (10, 11, ...): out of memory; 1 node (7): boom; 1 node (99): no reply before the round timeout"
    )


# --- partitions -------------------------------------------------------------------------------


def labels(n_per_class=40, classes=5):
    return np.repeat(np.arange(classes), n_per_class)


def test_iid_partitions_cover_every_row_once_and_mix_the_classes():
    from ml.data import all_partitions

    parts = all_partitions(labels(), num_partitions=20, partitioner="iid", seed=1)
    rows = np.concatenate(parts)
    assert sorted(rows.tolist()) == list(range(200)) and {len(p) for p in parts} == {10}
    assert all(len(set(labels()[p].tolist())) > 1 for p in parts)  # shuffled first: not one class per shard


def test_more_nodes_than_examples_is_a_clear_error():
    from ml.data import all_partitions

    with pytest.raises(ConfigError, match="201 partitions of the 200 training examples cannot each hold 1: use at most 200 nodes"):
        all_partitions(labels(), num_partitions=201, partitioner="iid")


def test_an_unsatisfiable_dirichlet_partition_names_the_fix():
    from ml.data import all_partitions

    # 50 partitions of 200 examples, 2 each at least (half of a fair share of 4), alpha 0.05:
    # a very skewed draw always leaves a partition short
    with pytest.raises(ConfigError) as err:
        all_partitions(labels(), num_partitions=50, partitioner="dirichlet", alpha=0.05, min_size=10, seed=0)
    text = str(err.value)
    assert "left a partition under 2 examples" in text and "Raise data.dirichlet-alpha" in text and 'data.partitioner = "iid"' in text
    sizes = [len(p) for p in all_partitions(labels(), num_partitions=50, partitioner="iid")]
    assert min(sizes) == 4  # the suggested fix works


def test_the_minimum_is_half_a_fair_share_but_never_zero():
    from ml.data import effective_min_size

    assert effective_min_size(10, 1780, 4) == 10
    assert effective_min_size(10, 1780, 100) == 8
    assert effective_min_size(10, 1780, 1000) == 1


def test_the_server_checks_partitions_before_round_1(caplog):
    from server_app.profiles import check_partitions
    from stamen.config import StamenConfig

    class Split:  # the train pool of a FederatedSplit
        def check_partitions(self, **kw):
            from ml.data import all_partitions

            return [len(p) for p in all_partitions(labels(), **kw)]

    cfg = StamenConfig.from_run_config({**_defaults(), "data.partitioner": "iid"})
    profiles = {1: {keys.NODE_NUM_PARTITIONS: 100}, 2: {keys.NODE_NUM_PARTITIONS: 100}}
    with caplog.at_level(logging.INFO):
        check_partitions(cfg, Split(), profiles)
    assert "data: 100 iid partitions of 2 to 2 examples" in caplog.text
    with pytest.raises(ConfigError, match="use at most 200 nodes"):
        check_partitions(cfg, Split(), {1: {keys.NODE_NUM_PARTITIONS: 1000}})


def _defaults():
    import tomllib
    from pathlib import Path

    return tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


# --- what grows per node ------------------------------------------------------------------------


def test_nodes_sent_the_same_arrays_share_one_record(flower_identity, fake_grid):
    strategy = flora()
    msgs = round_of(strategy, fake_grid, [1, 2, 3])
    records = {id(m.content.array_records[keys.ARRAYS]) for m in msgs.values()}
    assert len(records) == 1  # round 1: dense for all, packed once
    # a node-specific downlink gets its own: round 2, node 1 holds version 1, 2 and 3 are new
    ok, _ = good_reply(msgs[1], rank=2, n=10, seed=1)
    new, _ = strategy.aggregate_train(1, [ok])
    msgs2 = {m.metadata.dst_node_id: m for m in strategy.configure_train(2, new, ConfigRecord(), fake_grid([1, 2, 3, 4]))}
    modes = {n: m.content.config_records[keys.CONFIG][keys.SYNC_MODE] for n, m in msgs2.items()}
    assert modes == {1: keys.SYNC_STACKED, 2: keys.SYNC_DENSE, 3: keys.SYNC_DENSE, 4: keys.SYNC_DENSE}
    dense = {id(msgs2[n].content.array_records[keys.ARRAYS]) for n in (2, 3, 4)}
    assert len(dense) == 1 and id(msgs2[1].content.array_records[keys.ARRAYS]) not in dense


def test_a_node_that_keeps_no_weights_gets_them_dense_every_round(flower_identity, fake_grid):
    # rank 1: FLoRA's stack of two (2 x 14 numbers a module) is smaller than W (48), so it is sent
    flo = FLoRA(node_ranks={}, default_rank=1, lora_alpha=8.0, min_nodes=1)
    for strategy in (flo, FedIT(node_ranks={}, default_rank=1, lora_alpha=8.0, min_nodes=1)):
        strategy.declare_profiles({1: {keys.KEEPS_GLOBAL: False}, 2: {keys.KEEPS_GLOBAL: True}})
        msgs = round_of(strategy, fake_grid, [1, 2])
        replies = [good_reply(msgs[n], rank=1, n=10, seed=n)[0] for n in (1, 2)]
        new, _ = strategy.aggregate_train(1, replies)
        msgs2 = {m.metadata.dst_node_id: m for m in strategy.configure_train(2, new, ConfigRecord(), fake_grid([1, 2]))}
        modes = {n: m.content.config_records[keys.CONFIG][keys.SYNC_MODE] for n, m in msgs2.items()}
        assert modes[1] == keys.SYNC_DENSE and modes[2] != keys.SYNC_DENSE, (type(strategy).__name__, modes)


def test_a_simulated_node_says_it_keeps_no_weights():
    from client_app.sync import keeps_global

    assert keeps_global("simulation") is False
    assert keeps_global("simulation", in_simulation=True) is True  # simulation.keep-global: a small fleet, downlinks as deployed
    assert keeps_global("flower-supernode") is True and keeps_global("stamen-supernode") is True
