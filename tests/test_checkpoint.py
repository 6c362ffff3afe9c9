"""Checkpoints on tiny arrays: the state codec, atomic writes (a writer killed mid-write),
pruning, node matching after a restart, round numbering on resume, and the state each
strategy and wrapper carries over (server_app/checkpoint.py, server_app/resume.py)."""

import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from flwr.app import ConfigRecord, MetricRecord

from server_app import checkpoint
from server_app.resume import RoundOffset, check_config, match_nodes
from stamen import keys
from stamen.config import ConfigError
from strategies import FedSpine, FlexLoRA, FLoRA, HetLoRA
from strategies.bandit import Arm
from strategies.central_dp import CentralDP
from strategies.lora_records import ClientLoRA, to_record


# --- the codec ------------------------------------------------------------------------------
def test_codec_round_trips_what_json_cannot_hold():
    state = {
        "by_node": {3: {"arm": 1, "loss": 0.5}, 17: {"arm": 0, "loss": float("nan")}},
        "factors": {"q": (np.arange(6, dtype=np.float32).reshape(2, 3), np.ones((4, 2), np.float64))},
        "svd": {"q": np.linalg.svd(np.eye(3))},  # a namedtuple of arrays
        "rows": [{"node_id": 3, "epsilon": 1.25}],
        "rng": (3, tuple(range(5)), None),
        "none": None,
    }
    arrays = {}
    back = checkpoint.decode(checkpoint.encode(state, arrays), arrays)
    assert set(back["by_node"]) == {3, 17} and back["by_node"][3] == {"arm": 1, "loss": 0.5}
    assert math.isnan(back["by_node"][17]["loss"])
    a, b = back["factors"]["q"]
    assert a.dtype == np.float32 and np.array_equal(a, state["factors"]["q"][0]) and b.dtype == np.float64
    assert all(np.array_equal(x, y) for x, y in zip(back["svd"]["q"], state["svd"]["q"], strict=True))
    assert back["rng"] == (3, (0, 1, 2, 3, 4), None) and back["rows"] == state["rows"] and back["none"] is None


def test_codec_refuses_what_it_cannot_store():
    with pytest.raises(TypeError, match="set"):
        checkpoint.encode({"nodes": {1, 2}}, {})


# --- writing, reading, pruning ----------------------------------------------------------------
def _save(run, rnd, **kw):
    g = {"q.weight": np.full((2, 2), float(rnd), np.float32)}
    return checkpoint.write(run, rnd, state={"round": rnd, "by_node": {5: rnd}}, global_arrays=g, **kw)


def test_a_checkpoint_reads_back(tmp_path):
    _save(tmp_path, 1, adapter={"q.lora_A": np.ones((1, 2), np.float32), "q.lora_B": np.ones((2, 1), np.float32)})
    saved = checkpoint.latest(tmp_path)
    assert saved.server_round == 1 and saved.state["by_node"] == {5: 1}
    assert np.array_equal(saved.global_arrays["q.weight"], np.ones((2, 2), np.float32))
    assert set(saved.adapter) == {"q.lora_A", "q.lora_B"}


def test_the_last_k_and_the_best_round_are_kept(tmp_path):
    for rnd in range(1, 6):
        _save(tmp_path, rnd, keep=2, also_keep=2)
    assert list(checkpoint.rounds(tmp_path)) == [2, 4, 5]
    assert checkpoint.latest(tmp_path).server_round == 5
    assert checkpoint.latest(tmp_path, 2).state["round"] == 2
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint of round 3; there are rounds"):
        checkpoint.latest(tmp_path, 3)


def test_no_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint to resume from"):
        checkpoint.latest(tmp_path)


def test_a_writer_killed_mid_write_leaves_the_previous_checkpoint(tmp_path):
    """A real SIGKILL of the writing process after its arrays are on disk and before the
    rename: round 1 still loads, the partial round 2 is never read, the next save clears it."""
    script = textwrap.dedent(f"""
        import os, signal, json
        import numpy as np
        from server_app import checkpoint
        g = {{"q.weight": np.ones((64, 64), np.float32)}}
        checkpoint.write({str(tmp_path)!r}, 1, state={{"round": 1}}, global_arrays=g)
        real_dump = json.dump
        def dump_then_die(*a, **k):  # round 2: the arrays are written, the metadata half
            real_dump(*a, **k)
            a[1].flush()
            os.kill(os.getpid(), signal.SIGKILL)
        json.dump = dump_then_die
        checkpoint.write({str(tmp_path)!r}, 2, state={{"round": 2}}, global_arrays=g)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert (tmp_path / "checkpoints" / ".round-00002.partial" / "checkpoint.json").is_file()  # it died writing
    saved = checkpoint.latest(tmp_path)
    assert saved.server_round == 1 and saved.state == {"round": 1}
    _save(tmp_path, 2)
    assert not list((tmp_path / "checkpoints").glob(".*partial"))
    assert checkpoint.latest(tmp_path).server_round == 2


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path):
    _save(tmp_path, 1)
    path = _save(tmp_path, 2)
    (path / "arrays.npz").write_bytes(b"not a zip")
    assert checkpoint.latest(tmp_path).server_round == 1


# --- resume: nodes, rounds, config ------------------------------------------------------------
def test_nodes_keep_their_ids_or_are_matched_by_partition():
    saved = {11: 0, 12: 1, 13: 2}  # node -> partition id, in the checkpoint
    now = {11: {"partition-id": 0}, 21: {"partition-id": 1}, 22: {"partition-id": 0}, 23: {"partition-id": 5}}
    # 11 kept its id (--database); 12's partition came back as 21; 22 claims partition 0,
    # which 11 already holds; 13's partition did not come back
    assert match_nodes(saved, now) == {11: 11, 12: 21}


class _Recorder:
    def __init__(self):
        self.calls = []

    def configure_train(self, server_round, arrays, config, grid):
        self.calls.append(("configure", server_round))
        return []

    def aggregate_train(self, server_round, replies):
        self.calls.append(("aggregate", server_round))
        return None, None


def test_round_offset_numbers_the_rounds_on():
    inner = _Recorder()
    wrapped = RoundOffset(inner, offset=2)
    wrapped.configure_train(1, None, None, None)
    wrapped.aggregate_train(1, [])
    assert inner.calls == [("configure", 3), ("aggregate", 3)]
    seen = []
    evaluate = wrapped.evaluation(lambda rnd, arrays: seen.append(rnd))
    evaluate(0, None)  # Flower's round 0: the checkpoint's round, evaluated before the crash
    evaluate(1, None)
    assert seen == [3]


def test_a_resumed_run_must_keep_its_config():
    saved = {"strategy.name": "flora", "lora.rank": 8, "strategy.num-rounds": 4, "checkpoint.resume-from": ""}
    check_config(saved, {**saved, "strategy.num-rounds": 10, "checkpoint.resume-from": "runs/1"})
    with pytest.raises(ConfigError, match=r"lora.rank = 8 in the checkpoint, 16 now.*run-config.toml"):
        check_config(saved, {**saved, "lora.rank": 16})


# --- what each strategy carries over ------------------------------------------------------------
IN, OUT = 8, 6  # stacked rank-1+1 factors (2 x 14 numbers) are smaller than W (48)


def _global():
    return {"m.weight": np.zeros((OUT, IN), np.float32), "head.weight": np.zeros((2, IN), np.float32)}


def _update(node, rank, seed, n=10, scaling=1.0):
    rng = np.random.default_rng(seed)
    return ClientLoRA(factors={"m": (rng.normal(size=(rank, IN)).astype(np.float32), rng.normal(size=(OUT, rank)).astype(np.float32))},
                      num_examples=n, scaling=scaling, node_id=node)


def _modes(strategy, grid, arrays, rnd):
    msgs = strategy.configure_train(rnd, to_record(arrays), ConfigRecord(), grid)
    return {m.metadata.dst_node_id: m.content.config_records[keys.CONFIG][keys.SYNC_MODE] for m in msgs}


def test_flora_resumes_its_version_and_sends_every_node_dense(flower_identity, fake_grid):
    s = FLoRA(node_ranks={1: 1, 2: 1}, default_rank=1, lora_alpha=2.0, min_nodes=1)
    g = _global()
    _modes(s, fake_grid([1, 2]), g, 1)
    g = s.aggregate_lora([_update(1, 1, 1), _update(2, 1, 2)], [{"head.weight": g["head.weight"]}] * 2, g)
    assert set(_modes(s, fake_grid([1, 2]), g, 2).values()) == {keys.SYNC_STACKED}  # they hold version 1
    t = FLoRA(node_ranks={7: 1, 8: 1}, default_rank=1, lora_alpha=2.0, min_nodes=1)
    t.load_state_dict(s.state_dict(), {1: 7, 2: 8}.get)
    assert t.version == s.version == 1
    assert set(_modes(t, fake_grid([7, 8]), g, 2).values()) == {keys.SYNC_DENSE}  # a new run: nobody holds anything


def test_hetlora_carries_the_ranks_nodes_pruned_to_their_new_ids(flower_identity, fake_grid):
    s = HetLoRA(node_ranks={1: 4, 2: 4}, default_rank=4, lora_alpha=4.0, min_nodes=1)
    s.configure_train(1, to_record(_global()), ConfigRecord(), fake_grid([1, 2]))
    s.combine([_update(1, 2, 1), _update(2, 4, 2)])  # node 1 pruned to rank 2
    t = HetLoRA(node_ranks={7: 4, 8: 4}, default_rank=4, lora_alpha=4.0, min_nodes=1)
    t.load_state_dict(s.state_dict(), {1: 7, 2: 8}.get)
    assert t.node_ranks == {7: 2, 8: 4}
    assert all(np.array_equal(x, y) for m in s.adapter for x, y in zip(s.adapter[m], t.adapter[m], strict=True))
    assert t.base is not None and np.array_equal(t.base["m"], s.base["m"])


def test_flexlora_keeps_the_svd_it_took(flower_identity, fake_grid):
    s = FlexLoRA(node_ranks={1: 2, 2: 1}, default_rank=2, lora_alpha=2.0, min_nodes=1)
    s.configure_train(1, to_record(_global()), ConfigRecord(), fake_grid([1, 2]))
    s.combine([_update(1, 2, 1), _update(2, 1, 2)])
    t = FlexLoRA(node_ranks={1: 2, 2: 1}, default_rank=2, lora_alpha=2.0, min_nodes=1)
    arrays = {}
    t.load_state_dict(checkpoint.decode(checkpoint.encode(s.state_dict(), arrays), arrays), lambda n: n)
    for node in (1, 2):  # every node starts from exactly the factors it would have got
        for (a, b), (c, d) in zip(s.initial_factors(node).values(), t.initial_factors(node).values(), strict=True):
            assert np.array_equal(a, c) and np.array_equal(b, d)
    delta = s.global_delta["m"]
    (a, b), = FlexLoRA.global_adapter(t).values()
    assert np.allclose(b @ a, delta, atol=1e-5)  # the exported adapter is the global delta


def _fedspine(times=None):
    s = FedSpine(arms=[Arm(0.0, 2), Arm(0.5, 1)], node_ranks={}, default_rank=2, lora_alpha=2.0, min_nodes=1, time_weight=0.5)
    s.round_times = (lambda r: times) if times is not None else None
    return s


def test_fedspine_resumes_its_bandits_and_rewards_the_last_round_with_its_measured_times(flower_identity, fake_grid):
    s = _fedspine(times={1: 10.0, 2: 30.0, 3: 20.0})
    s.configure_train(1, to_record(_global()), ConfigRecord(), fake_grid([1, 2, 3]))
    for node in (1, 2, 3):
        s.observe_reply(node, MetricRecord({keys.LOSS_REFERENCE: 2.0, keys.LOSS_AFTER: 1.0}))
    arrays = {}
    state = checkpoint.decode(checkpoint.encode(s.state_dict(), arrays), arrays)
    t = _fedspine(times=None)  # the resumed run has no measurements of round 1
    t.load_state_dict(state, {1: 21, 2: 22, 3: 23}.get)
    s.settle()
    t.settle()
    for old, new in ((1, 21), (2, 22), (3, 23)):
        assert t.bandits[new].sums == s.bandits[old].sums  # the same rewards, time included
    assert s.bandits[1].sums != s.bandits[2].sums  # where the times differ, the rewards do
    assert sorted(c["node_id"] for c in t.choices) == [21, 22, 23]


def test_central_dp_epsilon_continues_after_a_resume(flower_identity):
    from opacus.accountants import RDPAccountant

    def wrapper():
        inner = FLoRA(node_ranks={}, default_rank=2, lora_alpha=2.0, min_nodes=1)
        return CentralDP(inner, noise_multiplier=1.0, clipping_norm=1.0, delta=1e-5)

    before = wrapper()
    before.releases = 3
    resumed = wrapper()
    resumed.load_state_dict(before.state_dict(), lambda n: n)
    resumed.releases += 1  # one more round released
    accountant = RDPAccountant()
    accountant.history = [(1.0, 1.0, 4)]
    assert resumed.epsilon() == pytest.approx(accountant.get_epsilon(1e-5))
    fresh = wrapper()
    fresh.releases = 1
    assert resumed.epsilon() > 1.5 * fresh.epsilon()  # not restarted at one release
    assert resumed.rng is not before.rng  # the noise is drawn afresh from the OS's entropy
