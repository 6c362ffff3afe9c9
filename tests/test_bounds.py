"""Bounded updates and bounded weights (strategies/bounds.py): the rules on numbers you can
check by hand, then the attacks through every strategy's configure_train / aggregate_train
with exact fake replies: an update scaled by 1e4 and a claim of 10^9 examples leave the
aggregate equal to the honest-only aggregate (drop), or bounded (clip)."""

import math

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from stamen import keys
from stamen.config import RobustConfig
from strategies import FedIT, FedSpine, FlexLoRA, FLoRA, HetLoRA, ReeFL
from strategies.bandit import Arm
from strategies.bounds import OFF, bounded_weights, capped_shares, norm_bound, norm_of, scale_to_bound
from strategies.central_dp import CentralDP
from strategies.lora_records import from_record, to_record


# --- the rules ------------------------------------------------------------------------------
def test_the_bound_is_a_multiple_of_the_median_or_the_cap_whichever_is_smaller():
    assert norm_bound([1.0, 2.0, 30.0], multiple=3.0, cap=0.0) == (6.0, "3 x the round's median 2")
    assert norm_bound([1.0, 2.0, 30.0], multiple=3.0, cap=4.0)[0] == 4.0
    assert norm_bound([1.0, 2.0, 30.0], multiple=3.0, cap=100.0)[0] == 6.0
    # two replies: their median is their mean, which one of them controls; only the cap applies
    assert norm_bound([1.0, 1e4], multiple=3.0, cap=0.0)[0] == math.inf
    assert norm_bound([1.0, 1e4], multiple=3.0, cap=5.0)[0] == 5.0
    # central DP turns the median rule off
    assert norm_bound([1.0, 2.0, 30.0], multiple=3.0, cap=0.0, relative=False)[0] == math.inf


def test_scaling_to_the_bound_finds_where_the_norm_meets_it():
    assert scale_to_bound(lambda t: 10.0 * t, 4.0) == pytest.approx(0.4, abs=1e-9)
    assert 10.0 * scale_to_bound(lambda t: 10.0 * t, 4.0) <= 4.0
    assert scale_to_bound(lambda t: 10.0 * t, 20.0) == 1.0  # within the bound: unchanged
    # not linear (an adapter moved along its factors): the norm at the answer is the bound
    t = scale_to_bound(lambda t: 10.0 * t * t, 2.5)
    assert t == pytest.approx(0.5, abs=1e-9) and 10.0 * t * t <= 2.5


def test_capped_shares_water_fill_to_exactly_the_share():
    # one claim of 10^9 against three of 100: it gets the others' sum, half of the total
    assert capped_shares({1: 1e9, 2: 100.0, 3: 100.0, 4: 100.0}, 0.5) == {1: 300.0, 2: 100.0, 3: 100.0, 4: 100.0}
    # two large claims: both capped to c = 0.4 x 1 / (1 - 0.8) = 2, and each is 2 / 5 of the total
    assert capped_shares({1: 10.0, 2: 10.0, 3: 1.0}, 0.4) == pytest.approx({1: 2.0, 2: 2.0, 3: 1.0})
    assert capped_shares({1: 3.0, 2: 2.0, 3: 2.0}, 0.5) == {1: 3.0, 2: 2.0, 3: 2.0}  # within the share: as claimed
    assert capped_shares({1: 5.0, 2: 1.0, 3: 1.0}, 0.2) == {1: 1.0, 2: 1.0, 3: 1.0}  # below 1/n: all the same


def test_a_weight_is_capped_by_the_profile_then_by_the_share_among_three_or_more():
    claims = {1: 1e9, 2: 100.0, 3: 150.0}
    assert bounded_weights(claims, declared={1: 50.0}, share=0.5, equal=False) == {1: 50.0, 2: 100.0, 3: 150.0}
    assert bounded_weights(claims, declared={1: 1e9}, share=0.5, equal=False) == {1: 250.0, 2: 100.0, 3: 150.0}  # the profile lied too
    assert bounded_weights({1: 1e9, 2: 100.0}, declared={}, share=0.5, equal=False) == {1: 1e9, 2: 100.0}  # two: no share rule
    assert bounded_weights(claims, declared={1: 50.0}, share=0.5, equal=True) == {1: 1.0, 2: 1.0, 3: 1.0}


# --- the attacks, through the strategies -----------------------------------------------------
IN, OUT = 8, 6
MODULES = ("layer.q", "layer.v")
HONEST = (1, 2, 3)
ATTACKER = 4


def global_state():
    rng = np.random.default_rng(0)
    return {
        **{m + ".weight": rng.normal(size=(OUT, IN)).astype(np.float32) for m in MODULES},
        "head.weight": np.zeros((2, IN), dtype=np.float32),
        "head.bias": np.zeros(2, dtype=np.float32),
    }


def lora_reply(instruction, node, *, rank, alpha, scale=1.0, n=100, sent=None):
    """Node ``node``'s honest reply (seeded by its id), its change from the ``sent`` adapter
    (none: a fresh LoRA) scaled by ``scale``, claiming ``n`` examples."""
    rng = np.random.default_rng(node)
    down = from_record(instruction.content.array_records[keys.ARRAYS])  # the head it was sent, plus its change
    arrays = {"head.weight": down["head.weight"] + np.float32(0.1 * node * scale), "head.bias": down["head.bias"] + np.float32(0.1 * scale)}
    for m in MODULES:
        da, db = 0.1 * rng.normal(size=(rank, IN)), 0.1 * rng.normal(size=(OUT, rank))
        a0, b0 = sent[m] if sent else (np.zeros((rank, IN)), np.zeros((OUT, rank)))
        if not sent:  # a fresh LoRA: its own A, a B that trained from zero
            a0, da = da * 10, np.zeros_like(da)
        arrays[m + keys.LORA_A] = (a0 + scale * da).astype(np.float32)
        arrays[m + keys.LORA_B] = (b0 + scale * db).astype(np.float32)
    metrics = MetricRecord({keys.NUM_EXAMPLES: n, keys.TRAIN_LOSS: 1.0, keys.LORA_ALPHA: alpha, keys.LORA_RANK: rank})
    return Message(RecordDict({keys.ARRAYS: to_record(arrays), keys.METRICS: metrics}), reply_to=instruction)


def sent_adapter(message):
    arrays = from_record(message.content.array_records[keys.ARRAYS])
    init = {k[len(keys.INIT_PREFIX):]: v.astype(np.float64) for k, v in arrays.items() if k.startswith(keys.INIT_PREFIX)}
    return {m: (init[m + keys.LORA_A], init[m + keys.LORA_B]) for m in MODULES} if init else None


RANK = 4
LORA_STRATEGIES = {
    "flora": lambda bounds: FLoRA(node_ranks={}, default_rank=RANK, lora_alpha=8.0, min_nodes=1, bounds=bounds),
    "fedit": lambda bounds: FedIT(node_ranks={}, default_rank=RANK, lora_alpha=8.0, min_nodes=1, seed=3, bounds=bounds),
    "hetlora": lambda bounds: HetLoRA(node_ranks={}, default_rank=RANK, lora_alpha=8.0, min_nodes=1, seed=3, bounds=bounds),
    "flexlora": lambda bounds: FlexLoRA(node_ranks={}, default_rank=RANK, lora_alpha=8.0, min_nodes=1, seed=3, bounds=bounds),
}


def lora_round(name, bounds, fake_grid, *, nodes, scale=None, claims=None, declared=None):
    """One round of strategy ``name`` with ``nodes`` replying; node -> scale / claim."""
    s = LORA_STRATEGIES[name](bounds)
    s.declare_profiles({n: {keys.NUM_EXAMPLES: v} for n, v in (declared or {}).items()})
    msgs = {m.metadata.dst_node_id: m for m in s.configure_train(1, to_record(global_state()), ConfigRecord(), fake_grid(list(nodes)))}
    replies = []
    for node in nodes:
        cfg = msgs[node].content.config_records[keys.CONFIG]
        replies.append(lora_reply(msgs[node], node, rank=int(cfg[keys.LORA_RANK]), alpha=float(cfg[keys.LORA_ALPHA]),
                                  scale=(scale or {}).get(node, 1.0), n=(claims or {}).get(node, 100), sent=sent_adapter(msgs[node])))
    new, metrics = s.aggregate_train(1, replies)
    return s, from_record(new), metrics


def delta_norm(new):
    g = global_state()
    return norm_of([new[k].astype(np.float64) - g[k] for k in sorted(g)])


@pytest.mark.parametrize("name", sorted(LORA_STRATEGIES))
def test_a_1e4_update_dropped_leaves_the_honest_aggregate(name, flower_identity, fake_grid):
    drop = RobustConfig(over_bound="drop")
    s, attacked, metrics = lora_round(name, drop, fake_grid, nodes=(*HONEST, ATTACKER), scale={ATTACKER: 1e4})
    _, honest, _ = lora_round(name, drop, fake_grid, nodes=HONEST)
    for k in honest:
        np.testing.assert_allclose(attacked[k], honest[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert "over the bound" in s.rounds[-1].dropped[ATTACKER] and metrics["num-clients"] == 3
    _, unbounded, _ = lora_round(name, OFF, fake_grid, nodes=(*HONEST, ATTACKER), scale={ATTACKER: 1e4})
    assert delta_norm(unbounded) > 100 * delta_norm(honest)  # what the bound prevents


@pytest.mark.parametrize("name", sorted(LORA_STRATEGIES))
def test_a_1e4_update_clipped_moves_the_model_by_at_most_the_bound(name, flower_identity, fake_grid):
    s, attacked, _ = lora_round(name, RobustConfig(over_bound="clip"), fake_grid, nodes=(*HONEST, ATTACKER), scale={ATTACKER: 1e4})
    assert ATTACKER in s.rounds[-1].clipped and not s.rounds[-1].dropped
    _, honest, _ = lora_round(name, OFF, fake_grid, nodes=HONEST)
    # the attacker weighs a quarter; its clipped update is at most 3x the median honest norm
    assert delta_norm(attacked) < 3 * delta_norm(honest) + 1.0


def test_an_update_five_times_the_others_is_clipped_to_three_times_their_median(flower_identity, fake_grid):
    """Five times: the mean of the norms would let it through (bound 3 x 2 = 6 > 5); the median does not."""
    s, _, _ = lora_round("flora", RobustConfig(), fake_grid, nodes=(*HONEST, ATTACKER), scale={ATTACKER: 5.0})
    assert ATTACKER in s.rounds[-1].clipped
    s2 = LORA_STRATEGIES["flora"](OFF)
    msgs = {m.metadata.dst_node_id: m for m in s2.configure_train(1, to_record(global_state()), ConfigRecord(), fake_grid([*HONEST, ATTACKER]))}
    parsed = {n: s2.parse(n, lora_reply(msgs[n], n, rank=RANK, alpha=8.0, scale=5.0 if n == ATTACKER else 1.0).content) for n in msgs}
    norms = {n: norm_of(s2.update_parts(n, p)) for n, p in parsed.items()}
    assert norms[ATTACKER] > 5 * max(norms[n] for n in HONEST) / 2  # it really is far out
    assert f"over the bound {3 * np.median(list(norms.values())):.4g}" in s.rounds[-1].clipped[ATTACKER]


def test_honest_replies_within_the_bound_aggregate_as_without_it(flower_identity, fake_grid):
    for name in LORA_STRATEGIES:
        _, bounded, _ = lora_round(name, RobustConfig(), fake_grid, nodes=(*HONEST, ATTACKER))
        _, unbounded, _ = lora_round(name, OFF, fake_grid, nodes=(*HONEST, ATTACKER))
        for k in bounded:
            np.testing.assert_array_equal(bounded[k], unbounded[k], err_msg=f"{name} {k}")


@pytest.mark.parametrize("name", sorted(LORA_STRATEGIES))
def test_a_claim_of_1e9_examples_is_capped_by_the_profile(name, flower_identity, fake_grid):
    claims = {1: 100, 2: 200, 3: 300, ATTACKER: 10**9}
    s, attacked, _ = lora_round(name, RobustConfig(), fake_grid, nodes=(*HONEST, ATTACKER), claims=claims, declared={ATTACKER: 250})
    _, expected, _ = lora_round(name, OFF, fake_grid, nodes=(*HONEST, ATTACKER), claims={**claims, ATTACKER: 250})
    for k in expected:
        np.testing.assert_allclose(attacked[k], expected[k], rtol=1e-6, err_msg=k)
    assert "counted as 250" in s.rounds[-1].reweighted[ATTACKER]


@pytest.mark.parametrize("name", sorted(LORA_STRATEGIES))
def test_a_claim_of_1e9_examples_backed_by_a_lying_profile_weighs_at_most_half(name, flower_identity, fake_grid):
    claims = {1: 100, 2: 200, 3: 300, ATTACKER: 10**9}
    _, attacked, _ = lora_round(name, RobustConfig(), fake_grid, nodes=(*HONEST, ATTACKER), claims=claims, declared={ATTACKER: 10**9})
    _, expected, _ = lora_round(name, OFF, fake_grid, nodes=(*HONEST, ATTACKER), claims={**claims, ATTACKER: 600})  # the others' sum
    for k in expected:
        np.testing.assert_allclose(attacked[k], expected[k], rtol=1e-6, err_msg=k)
    # without the bound the attacker's head is the global head
    _, unbounded, _ = lora_round(name, OFF, fake_grid, nodes=(*HONEST, ATTACKER), claims=claims)
    np.testing.assert_allclose(unbounded["head.weight"], 0.1 * ATTACKER, rtol=1e-5)


def test_equal_weights_ignore_every_claim(flower_identity, fake_grid):
    claims = {1: 100, 2: 200, 3: 300, ATTACKER: 10**9}
    _, equal, _ = lora_round("flora", RobustConfig(weights="equal"), fake_grid, nodes=(*HONEST, ATTACKER), claims=claims)
    np.testing.assert_allclose(equal["head.weight"], 0.1 * np.mean([1, 2, 3, ATTACKER]), rtol=1e-6)


# --- FedSpine: pruned factors -------------------------------------------------------------------
def fedspine_reply(instruction, node, *, scale=1.0, n=100):
    rng = np.random.default_rng(node)
    rows = [0, 2] if node % 2 else [0, 1, 2, 3]
    arrays = {
        "m.lora_A": rng.normal(size=(2, 3)).astype(np.float32), "m.lora_B": (0.1 * scale * rng.normal(size=(len(rows), 2))).astype(np.float32),
        "head.weight": np.full((2, 3), 0.1 * scale, np.float32), "kept.m.rows": np.asarray(rows, np.int64), "kept.m.cols": np.arange(3, dtype=np.int64),
    }
    metrics = MetricRecord({keys.NUM_EXAMPLES: n, keys.TRAIN_LOSS: 1.0, keys.LORA_ALPHA: 2.0, keys.LORA_RANK: 2, keys.LOSS_START: 2.0,
                            keys.LOSS_END: 1.0, keys.LOSS_REFERENCE: 2.0, keys.LOSS_AFTER: 1.0})
    return Message(RecordDict({keys.ARRAYS: to_record(arrays), keys.METRICS: metrics}), reply_to=instruction)


def fedspine_round(bounds, fake_grid, nodes, scale=None):
    s = FedSpine(arms=[Arm(0.0, 2)], node_ranks={}, default_rank=2, lora_alpha=2.0, min_nodes=1, bounds=bounds)
    g = {"m.weight": np.zeros((4, 3), np.float32), "head.weight": np.zeros((2, 3), np.float32)}
    msgs = {m.metadata.dst_node_id: m for m in s.configure_train(1, to_record(g), ConfigRecord(), fake_grid(list(nodes)))}
    new, _ = s.aggregate_train(1, [fedspine_reply(msgs[n], n, scale=(scale or {}).get(n, 1.0)) for n in nodes])
    return s, from_record(new)


def test_fedspine_drops_a_1e4_pruned_update_and_keeps_the_honest_aggregate(flower_identity, fake_grid):
    s, attacked = fedspine_round(RobustConfig(over_bound="drop"), fake_grid, (*HONEST, ATTACKER), {ATTACKER: 1e4})
    _, honest = fedspine_round(RobustConfig(over_bound="drop"), fake_grid, HONEST)
    assert ATTACKER in s.rounds[-1].dropped
    for k in honest:
        np.testing.assert_allclose(attacked[k], honest[k], rtol=1e-6, err_msg=k)


# --- the early-exit family: dense parameter changes ---------------------------------------------
REQUIRED = {"emb": 1, "block0": 1, "block1": 2, "heads.0.w": 1, "heads.1.w": 2}


def exit_round(bounds, fake_grid, nodes, scale=None, claims=None):
    s = ReeFL(node_exits=dict.fromkeys(nodes, 2), num_exits=2, required_exits=REQUIRED, min_nodes=1, bounds=bounds)
    g = {k: np.full(3, float(i), np.float32) for i, k in enumerate(REQUIRED)}
    msgs = {m.metadata.dst_node_id: m for m in s.configure_train(1, to_record(g), ConfigRecord(), fake_grid(list(nodes)))}
    replies = []
    for n in nodes:
        rng = np.random.default_rng(n)
        arrays = {k: (v + (scale or {}).get(n, 1.0) * 0.1 * rng.normal(size=v.shape)).astype(np.float32) for k, v in g.items()}
        metrics = MetricRecord({keys.NUM_EXAMPLES: (claims or {}).get(n, 100), keys.TRAIN_LOSS: 1.0})
        replies.append(Message(RecordDict({keys.ARRAYS: to_record(arrays), keys.METRICS: metrics}), reply_to=msgs[n]))
    new, _ = s.aggregate_train(1, replies)
    return s, g, from_record(new)


def test_an_early_exit_update_of_1e4_is_dropped_or_clipped_and_a_1e9_claim_weighs_at_most_half(flower_identity, fake_grid):
    s, _, attacked = exit_round(RobustConfig(over_bound="drop"), fake_grid, (*HONEST, ATTACKER), {ATTACKER: 1e4})
    _, _, honest = exit_round(RobustConfig(over_bound="drop"), fake_grid, HONEST)
    assert ATTACKER in s.rounds[-1].dropped
    for k in honest:
        np.testing.assert_allclose(attacked[k], honest[k], rtol=1e-6, err_msg=k)

    s, g, clipped = exit_round(RobustConfig(), fake_grid, (*HONEST, ATTACKER), {ATTACKER: 1e4})
    assert ATTACKER in s.rounds[-1].clipped
    change = norm_of([clipped[k].astype(np.float64) - g[k] for k in g])
    assert change < 3 * norm_of([honest[k].astype(np.float64) - g[k] for k in g]) + 1.0

    claims = {1: 100, 2: 200, 3: 300, ATTACKER: 10**9}
    _, _, attacked = exit_round(RobustConfig(), fake_grid, (*HONEST, ATTACKER), claims=claims)
    _, _, expected = exit_round(OFF, fake_grid, (*HONEST, ATTACKER), claims={**claims, ATTACKER: 600})
    for k in expected:
        np.testing.assert_allclose(attacked[k], expected[k], rtol=1e-6, err_msg=k)


# --- with central DP -------------------------------------------------------------------------
def test_under_central_dp_the_median_rule_is_off_and_only_the_dp_clipping_bounds(flower_identity, fake_grid):
    """Honest updates far below C and one far above: the DP clipping brings it to C. The
    median rule would then clip it further, by a factor set by the other nodes' updates,
    which breaks the C / m sensitivity the accountant assumes."""
    s = CentralDP(LORA_STRATEGIES["flora"](RobustConfig()), noise_multiplier=1e-9, clipping_norm=50.0, delta=1e-5)
    msgs = {m.metadata.dst_node_id: m for m in s.configure_train(1, to_record(global_state()), ConfigRecord(), fake_grid([*HONEST, ATTACKER]))}
    replies = [lora_reply(msgs[n], n, rank=RANK, alpha=8.0, scale=100.0 if n == ATTACKER else 1.0) for n in msgs]
    s.aggregate_train(1, replies)
    assert not s.strategy.rounds[-1].clipped and not s.strategy.rounds[-1].dropped


@pytest.mark.parametrize("name", ["fedit", "flexlora", "hetlora"])
def test_an_adapter_strategy_measures_the_change_from_the_adapter_it_sent(name, flower_identity, fake_grid):
    """Round 2 starts from a large adapter (round 1's updates were 20x): the products of
    all replies are then about the same, and only their change from what was sent shows
    the node that moved five times as far as the others."""
    s = LORA_STRATEGIES[name](RobustConfig())
    nodes = [*HONEST, ATTACKER]
    arrays = global_state()
    for server_round, scale in ((1, dict.fromkeys(nodes, 20.0)), (2, {ATTACKER: 5.0})):
        msgs = {m.metadata.dst_node_id: m for m in s.configure_train(server_round, to_record(arrays), ConfigRecord(), fake_grid(nodes))}
        replies = []
        for node in nodes:
            cfg = msgs[node].content.config_records[keys.CONFIG]
            replies.append(lora_reply(msgs[node], node, rank=int(cfg[keys.LORA_RANK]), alpha=float(cfg[keys.LORA_ALPHA]),
                                      scale=scale.get(node, 1.0), sent=sent_adapter(msgs[node])))
        new, _ = s.aggregate_train(server_round, replies)
        arrays = from_record(new)
        if server_round == 1:
            assert not s.rounds[-1].clipped
    assert list(s.rounds[-1].clipped) == [ATTACKER]


# --- honest counts: metrics.csv, rounds.csv and clients.csv tell the same story ---------------
def test_the_three_tables_agree_on_accepted_clipped_rejected_and_late(flower_identity, fake_grid):
    from measurements.aggregation import TimedStrategy
    from measurements.grid import SentMessage
    from measurements.tables import ACCEPTED, client_rows

    s = TimedStrategy(LORA_STRATEGIES["flora"](RobustConfig()))
    nodes = [1, 2, 3, 4, 5, 6]
    msgs = {m.metadata.dst_node_id: m for m in s.configure_train(1, to_record(global_state()), ConfigRecord(), fake_grid(nodes))}
    replies = [lora_reply(msgs[n], n, rank=RANK, alpha=8.0, scale=1e4 if n == 4 else 1.0, n=10**9 if n == 3 else 100) for n in (1, 2, 3, 4, 5)]
    replies[4].content.metric_records[keys.METRICS][keys.LORA_RANK] = 99  # node 5: not the rank it was assigned
    _, metrics = s.aggregate_train(1, replies)  # node 6 never replies
    timing = s.timings[1]
    assert timing.accepted == [1, 2, 3, 4] and timing.rejected == [5] and timing.late == [6]
    assert timing.outcome_of("clipped") == [4] and timing.outcome_of("reweighted") == [3]
    assert metrics["num-clients"] == len(timing.accepted)
    assert metrics["dropped"] == len(timing.errors) + len(timing.late) + len(timing.rejected)

    sent = [SentMessage(f"m{n}", n, "train", "1", 0.0, 10, received_unix_s=None if n == 6 else 1.0) for n in nodes]
    rows = {r["node_id"]: r for r in client_rows(sent, [], outcomes={(1, n): o for n, o in timing.outcomes.items()})}
    assert {n: r["status"] for n, r in rows.items()} == {1: "ok", 2: "ok", 3: "reweighted", 4: "clipped", 5: "rejected", 6: "late"}
    assert "over the bound" in rows[4]["reason"] and "assigned rank" in rows[5]["reason"] and "counted as" in rows[3]["reason"]
    assert sum(r["status"] in ACCEPTED for r in rows.values()) == metrics["num-clients"]


# --- one bad node's config leaves that node out, not the run ---------------------------------
def test_a_node_whose_rank_is_invalid_is_left_out_naming_the_key(run_config):
    from server_app.profiles import leave_out, ranks_from_profiles
    from stamen.config import StamenConfig

    lora = StamenConfig.from_run_config({**run_config, "lora.max-rank": 32}).lora
    profiles = {
        1: {"device-class": "jetson"},
        2: {"lora-rank": -1},
        3: {"lora-rank": 48},  # above lora.max-rank
        4: {"lora-rank": 20},  # above the model's dimension (16 here)
        5: {"lora-rank": "8"},
        6: {"lora-rank": 8},
    }
    ranks, left_out = ranks_from_profiles(profiles, lora, max_rank=16)
    assert ranks == {1: lora.rank_for("jetson"), 6: 8}
    assert set(left_out) == {2, 3, 4, 5}
    assert left_out[2].startswith("node-config lora-rank = -1: must be an integer in 1..16")
    s = LORA_STRATEGIES["flora"](RobustConfig())
    leave_out(s, left_out)
    assert set(s.retired) == {2, 3, 4, 5}  # never sampled


def test_a_node_whose_profile_query_fails_is_named_not_given_defaults(flower_identity):
    """An unknown node-config device-class makes the node's query handler raise: its error
    reply names the key, and the node is left out rather than trained at the default rank."""
    from flwr.app import Error

    from server_app.profiles import query_profiles

    class Grid:
        def get_node_ids(self):
            return [1, 2, 3]

        def send_and_receive(self, messages, timeout):
            for m in messages:
                if m.metadata.dst_node_id == 1:
                    yield Message(RecordDict({keys.PROFILE: ConfigRecord({"device-class": "cpu"})}), reply_to=m)
                elif m.metadata.dst_node_id == 2:
                    yield Message(Error(code=0, reason="ValueError: node-config device-class='toaster': accepted values: ..."), reply_to=m)
                # node 3 never answers

    profiles, failed = query_profiles(Grid(), min_nodes=1, timeout=1.0)
    assert set(profiles) == {1} and set(failed) == {2}
    assert "device-class='toaster'" in failed[2]


# --- a node that joins mid-run is profiled and gets its own rank ---------------------------------
def test_a_node_that_joins_mid_run_is_admitted_before_it_is_sampled(flower_identity, fake_grid):
    s = LORA_STRATEGIES["flora"](RobustConfig())
    admitted = []

    def admit(grid, nodes):  # what the ServerApp does: query the profile, set the rank
        admitted.append(list(nodes))
        s.node_ranks.update(dict.fromkeys(nodes, 2))

    s.admit_new_nodes(admit, known=[1, 2])
    list(s.configure_train(1, to_record(global_state()), ConfigRecord(), fake_grid([1, 2])))
    assert admitted == []
    msgs = {m.metadata.dst_node_id: m for m in s.configure_train(2, to_record(global_state()), ConfigRecord(), fake_grid([1, 2, 9]))}
    assert admitted == [[9]]
    assert msgs[9].content.config_records[keys.CONFIG][keys.LORA_RANK] == 2  # its own, not the default 4
    list(s.configure_train(3, to_record(global_state()), ConfigRecord(), fake_grid([1, 2, 9])))
    assert admitted == [[9]]  # once
