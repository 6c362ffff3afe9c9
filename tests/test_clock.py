"""The simulated clock: a round lasts as long as its slowest participant, the deadline
drops late nodes as a real run would, and the tables carry the simulated times."""

import json

import pytest
from flwr.app import ConfigRecord

from measurements.clock import ClockedStrategy, Fleet, SimulatedClock
from measurements.latency_model import DeviceModel, LatencyModel, LatencyModelError, LinkModel
from stamen import keys
from strategies.flora import FLoRA
from strategies.lora_records import to_record
from tests.test_flora_strategy import global_state, good_reply

MODEL = LatencyModel(
    devices={
        "pi": DeviceModel(startup_s=2.0, step_s=1.0, step_per_rank_s=0.1, wait_s=0.5),  # 10 steps of rank 2: 14 s
        "gpu": DeviceModel(startup_s=1.0, step_s=0.1, wait_s=0.5),  # 10 steps: 1 s
    },
    down={"wifi": LinkModel(latency_s=0.01, mbit=100.0), "5g": LinkModel(latency_s=0.05, mbit=8.0)},
    up={"wifi": LinkModel(latency_s=0.01, mbit=80.0), "5g": LinkModel(latency_s=0.05, mbit=1.0)},
    steps=10,
)


def test_the_fleet_spec_places_nodes_by_partition_id():
    fleet = Fleet.parse("pi=2 gpu@5g=1, pi@5g=3", default_network="wifi")
    assert fleet.size == 6
    assert [fleet.of(i) for i in range(6)] == [("pi", "wifi")] * 2 + [("gpu", "5g")] + [("pi", "5g")] * 3
    with pytest.raises(LatencyModelError, match="outside the fleet of 6"):
        fleet.of(6)
    for bad in ("pi", "pi=0", "pi=x", "=3"):
        with pytest.raises(LatencyModelError, match="expected device"):
            Fleet.parse(bad, default_network="wifi")
    with pytest.raises(LatencyModelError, match="fleet device 'toaster' is not in the latency model"):
        Fleet.parse("toaster=1", default_network="wifi").check(MODEL)


def clocked(deadline, fleet="pi=1 gpu=1 gpu@5g=1", on_hidden=None):
    clock = SimulatedClock(MODEL, Fleet.parse(fleet, default_network="wifi"), steps=10, deadline=deadline)
    clock.assign({1: {keys.NODE_PARTITION_ID: 0}, 2: {keys.NODE_PARTITION_ID: 1}, 3: {keys.NODE_PARTITION_ID: 2}})
    flora = FLoRA(node_ranks={}, default_rank=2, lora_alpha=8.0, min_nodes=1)
    return clock, ClockedStrategy(flora, clock, on_hidden=on_hidden), flora


def play_round(strategy, fake_grid):
    msgs = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, to_record(global_state()), ConfigRecord(), fake_grid([1, 2, 3]))}
    replies = [good_reply(msgs[n], rank=2, n=10, seed=n)[0] for n in (1, 2, 3)]
    return msgs, replies, strategy.aggregate_train(1, replies)


def test_a_round_lasts_as_long_as_its_slowest_participant(flower_identity, fake_grid):
    clock, strategy, flora = clocked(deadline=600.0)
    msgs, replies, (new, metrics) = play_round(strategy, fake_grid)
    assert metrics["num-clients"] == 3
    down = msgs[1].content.array_records[keys.ARRAYS].count_bytes()
    up = replies[0].content.array_records[keys.ARRAYS].count_bytes()
    pi = clock.phases[(1, 1)]
    assert pi["train_s"] == pytest.approx(2.0 + 10 * (1.0 + 0.1 * 2))
    assert pi["downlink_s"] == pytest.approx(0.01 + 8 * down / 100e6) and pi["uplink_s"] == pytest.approx(0.01 + 8 * up / 80e6)
    assert pi["e2e_s"] == pytest.approx(pi["downlink_s"] + pi["train_s"] + pi["uplink_s"] + 0.5)
    e2e = {n: clock.phases[(1, n)]["e2e_s"] for n in (1, 2, 3)}
    assert e2e[1] > e2e[3] > e2e[2]  # the Pi trains slowest; of the GPUs, the one on 5G waits for its link
    assert clock.round_s(1, server_s=0.25, cut=False) == pytest.approx(max(e2e.values()) + 0.25)
    assert clock.elapsed() == pytest.approx(max(e2e.values()) + 0.25)
    assert clock.times(1) == pytest.approx(e2e)


def test_the_deadline_drops_late_nodes_and_cuts_the_round(flower_identity, fake_grid):
    hidden = []
    clock, strategy, flora = clocked(deadline=5.0, on_hidden=hidden.extend)  # the Pi's 14 s is late; both GPUs are in time
    _, _, (new, metrics) = play_round(strategy, fake_grid)
    assert metrics["num-clients"] == 2
    assert [m.metadata.src_node_id for m in hidden] == [1]  # its telemetry is still read (clients.csv keeps its measurements)
    assert flora.rounds[-1].dropped == {1: "no reply before the round timeout"}  # as a real run drops it
    assert set(clock.times(1)) == {2, 3}  # FedSpine's reward sees the in-time nodes only
    assert clock.round_s(1, server_s=0.25, cut=True) == pytest.approx(5.0 + 0.25)  # waited for the deadline

    row = clock.rewrite({"round": 1, "node_id": 1, "status": "ok", "reason": "", "train_s": 0.3, "loop_s": 0.2, "e2e_s": 3.0,
                         "device": "cpu", "network": "unknown", "clock": "measured", "transfer_via": "unavailable"})
    assert row["status"] == "late" and "simulated 1" in row["reason"] and "strategy.round-timeout = 5 s" in row["reason"]
    assert row["clock"] == "simulated" and row["device"] == "pi" and row["network"] == "wifi"
    assert row["train_s"] == pytest.approx(14.0) and row["load_s"] == 2.0 and row["loop_s"] == pytest.approx(12.0)
    untouched = {"round": 1, "node_id": 9, "clock": "measured"}
    assert clock.rewrite(untouched) is untouched


def test_the_simulated_time_goes_on_after_a_resume(flower_identity, fake_grid):
    from server_app import checkpoint

    clock, strategy, _ = clocked(deadline=600.0)
    play_round(strategy, fake_grid)
    clock.round_s(1, server_s=0.5, cut=False)
    again, _, _ = clocked(deadline=600.0)
    arrays = {}
    stored = json.loads(json.dumps(checkpoint.encode(clock.state_dict(), arrays)))  # as checkpoint.json holds it
    again.load_state_dict(checkpoint.decode(stored, arrays), node=lambda n: n)
    assert again.elapsed() == pytest.approx(clock.elapsed()) and again.elapsed() > 0.5


def test_strategies_that_read_measured_times_read_the_simulated_ones(flower_identity, fake_grid):
    """FedSpine's reward takes ``round_times`` from the measurement session: on a simulated
    clock, those are the clock's (in-time nodes only), not the host's."""
    from measurements.session import MeasurementSession

    clock, strategy, _ = clocked(deadline=5.0)
    play_round(strategy, fake_grid)
    session = MeasurementSession(None, run_id=1, enabled=False)
    session.clock = clock
    assert session.round_times(1) == clock.times(1) and set(session.round_times(1)) == {2, 3}
