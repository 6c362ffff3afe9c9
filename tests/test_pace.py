"""Compute emulation (client_app/pace.py): a node pads its training to the emulated
device's time, says so in clients.csv, and says when the host was the slower one."""

import time

import pytest

from client_app.pace import emulated_train_s, paced
from measurements import events as ev
from measurements.grid import SentMessage
from measurements.latency_model import DeviceModel, LatencyModel, LinkModel
from measurements.phases import recording
from measurements.tables import client_rows
from stamen import keys


@pytest.fixture()
def model_file(tmp_path):
    model = LatencyModel(devices={"pi": DeviceModel(startup_s=0.05, step_s=0.01, step_per_rank_s=0.001, step_per_prune_s=-0.01)},
                         down={"wifi": LinkModel(0.0, 100.0)}, up={"wifi": LinkModel(0.0, 80.0)}, steps=10)
    path = tmp_path / "model.json"
    model.save(path)
    return path


def test_the_target_is_the_devices_time_for_this_work(model_file):
    node = {keys.NODE_EMULATE_DEVICE: "pi", keys.NODE_LATENCY_MODEL: str(model_file)}
    target = emulated_train_s(node, {keys.LORA_RANK: 8, keys.PRUNE_RATIO: 0.5}, local_steps=10)
    assert target == pytest.approx(0.05 + 10 * (0.01 + 0.001 * 8 - 0.01 * 0.5))
    assert emulated_train_s({}, {keys.LORA_RANK: 8}, local_steps=10) is None  # no emulation asked for
    with pytest.raises(ValueError, match="not in"):
        emulated_train_s({**node, keys.NODE_EMULATE_DEVICE: "toaster"}, {}, local_steps=1)
    with pytest.raises(ValueError, match="needs latency-model"):
        emulated_train_s({keys.NODE_EMULATE_DEVICE: "pi"}, {}, local_steps=1)


def test_a_fast_host_waits_out_the_rest():
    t0 = time.perf_counter()
    with recording() as phases, paced(0.2):
        time.sleep(0.05)
    assert time.perf_counter() - t0 >= 0.2
    assert phases.durations["emulated_wait"] == pytest.approx(0.15, abs=0.05) and "emulated_over" not in phases.durations


def test_a_slow_host_cannot_pad_and_says_by_how_much():
    with recording() as phases, paced(0.01):
        time.sleep(0.06)
    assert "emulated_wait" not in phases.durations and phases.durations["emulated_over"] == pytest.approx(0.05, abs=0.03)


def test_clients_csv_says_which_clock_the_training_ran_on():
    sent = [SentMessage(f"m{i}", i, "train", "1", 100.0, 10, received_unix_s=101.0) for i in range(3)]
    events = [
        (ev.Event("train", 100.1, 0.5, values={}, node_id=0, message_id="m0"), "reply"),
        (ev.Event("train", 100.1, 0.5, values={"emulated_wait_s": 0.3}, node_id=1, message_id="m1"), "reply"),
        (ev.Event("train", 100.1, 0.5, values={"emulated_over_s": 0.2}, node_id=2, message_id="m2"), "reply"),
    ]
    rows = client_rows(sent, events)
    assert [r["clock"] for r in rows] == ["measured", "emulated", "emulated-late"]
