"""The instrumentation layer's pieces on small, hand-checkable inputs."""

import dataclasses
import time

import pytest
from flwr.proto.fleet_pb2 import PullMessagesRequest, PullMessagesResponse, PushMessagesRequest, PushMessagesResponse
from flwr.proto.message_pb2 import (
    ConfirmMessageReceivedRequest,
    ConfirmMessageReceivedResponse,
    PullObjectRequest,
    PullObjectResponse,
    PushObjectRequest,
    PushObjectResponse,
)

from measurements import events as ev
from measurements.grid import SentMessage
from measurements.phases import phase, recording
from measurements.resources import ResourceSampler
from measurements.spool import REPLY, SENDING, TELEMETRY, Spool
from measurements.tables import client_rows, resource_rows
from measurements.telemetry import ClockProbe, TelemetryCollector, TelemetrySender, TelemetryStore, best_probe
from measurements.transport import TransferTracker

# -- clock offset ----------------------------------------------------------------------


def test_clock_probe_offset_and_rtt_by_hand():
    # the server's clock is 10 s ahead; 0.1 s each way; the server holds the probe 0.05 s
    p = ClockProbe(node_send=100.0, server_receive=110.1, server_send=110.15, node_receive=100.25)
    assert p.offset_s == pytest.approx(10.0)
    assert p.rtt_s == pytest.approx(0.2)


def test_asymmetric_path_error_is_bounded_by_half_rtt_and_min_rtt_wins():
    # true offset 10 s; probe a: 0.3 s out, 0.1 s back -> error +0.1; probe b: symmetric 0.05
    a = ClockProbe(0.0, 10.3, 10.3, 0.4)
    b = ClockProbe(1.0, 11.05, 11.05, 1.1)
    assert a.offset_s == pytest.approx(10.1) and abs(a.offset_s - 10.0) <= a.rtt_s / 2
    assert best_probe([a, b]) is b and b.offset_s == pytest.approx(10.0)
    with pytest.raises(ValueError):
        best_probe([])


# -- transfer tracking -----------------------------------------------------------------


def _pull_response(message_id="m1", run_id=7, group="3"):
    res = PullMessagesResponse()
    msg = res.messages_list.add()
    msg.metadata.message_id, msg.metadata.run_id, msg.metadata.group_id = message_id, run_id, group
    return res


def _push_request(reply_to="m1", run_id=7):
    req = PushMessagesRequest()
    msg = req.messages_list.add()
    msg.metadata.reply_to_message_id, msg.metadata.run_id, msg.metadata.group_id = reply_to, run_id, "3"
    return req


def test_tracker_turns_rpcs_into_one_downlink_and_one_uplink():
    out: list[ev.Event] = []
    t = TransferTracker(out.append)
    t.node_id = 42
    # an empty poll is not a transfer
    t.on_rpc("PullMessages", PullMessagesRequest(), PullMessagesResponse(), 0.0, 0.0, 0.01, True)
    assert out == []
    t.on_rpc("PullMessages", PullMessagesRequest(), _pull_response(), 1000.0, 10.0, 10.1, True)
    t.on_rpc("GetRun", PullMessagesRequest(), PullMessagesResponse(), 0, 10.1, 10.3, True)  # setup: 0.2 s
    big = PullObjectResponse(object_content=b"x" * 1000, object_found=True, object_available=True)
    t.on_rpc("PullObject", PullObjectRequest(object_id="a"), big, 0, 10.3, 10.8, True)
    not_yet = PullObjectResponse(object_found=True, object_available=False)  # the ServerApp has not pushed it yet
    t.on_rpc("PullObject", PullObjectRequest(object_id="b"), not_yet, 0, 10.3, 10.35, True)
    t.on_rpc("PullObject", PullObjectRequest(object_id="b"), big, 0, 10.4, 11.0, True)  # concurrent with the first
    t.on_rpc("ConfirmMessageReceived", ConfirmMessageReceivedRequest(), ConfirmMessageReceivedResponse(), 0, 11.0, 11.1, True)
    (down,) = out
    assert down.kind == ev.DOWNLINK and down.message_id == "m1" and down.run_id == 7 and down.node_id == 42
    assert down.duration_s == pytest.approx(11.1 - 10.0 - 0.2)  # span, less GetRun
    assert down.values["setup_s"] == pytest.approx(0.2) and down.values["rpcs"] == 6 and down.values["retries"] == 1
    assert down.values["bytes"] >= 2000 and down.start_unix_s == 1000.0 and down.labels["round"] == "3"

    push = _push_request()
    t.on_rpc("PushMessages", push, PushMessagesResponse(), 2000.0, 20.0, 20.1, True)
    obj = PushObjectRequest(object_content=b"y" * 500)
    t.on_rpc("PushObject", obj, PushObjectResponse(), 0, 20.1, 20.6, True)
    assert len(out) == 1  # the uplink ends when the SuperNode polls again
    t.on_rpc("PullMessages", PullMessagesRequest(), PullMessagesResponse(), 0, 21.0, 21.01, True)
    up = out[1]
    assert up.kind == ev.UPLINK and up.message_id == "m1"  # keyed by the instruction it answers
    assert up.duration_s == pytest.approx(0.6)
    assert up.values["bytes"] == push.ByteSize() + obj.ByteSize()


def test_tracker_flush_emits_an_open_uplink():
    out: list[ev.Event] = []
    t = TransferTracker(out.append)
    t.on_rpc("PushMessages", _push_request(), PushMessagesResponse(), 5.0, 1.0, 1.5, True)
    t.flush()
    assert [e.kind for e in out] == [ev.UPLINK] and out[0].duration_s == pytest.approx(0.5)


# -- phases and resources --------------------------------------------------------------


def test_phases_record_only_inside_a_recorder():
    with phase("load"):
        pass  # no recorder: nothing to record, nothing raised
    with recording() as rec:
        with phase("load"):
            time.sleep(0.02)
        with phase("load"):
            pass
        with phase("loop"):
            pass
    assert set(rec.durations) == {"load", "loop"} and rec.durations["load"] >= 0.02


def _spin(cpu_seconds: float) -> None:
    """Burn ``cpu_seconds`` of this process's CPU time, however long the machine takes."""
    end = time.process_time() + cpu_seconds
    while time.process_time() < end:
        pass


def test_phases_record_the_cpu_time_spent_in_them():
    with recording() as rec:
        with phase("busy"):
            _spin(0.15)
        with phase("idle"):
            time.sleep(0.15)
    assert rec.cpu["busy"] >= 0.15  # spun until the process had spent 0.15 CPU s
    assert rec.durations["busy"] >= rec.cpu["busy"] * 0.95  # one thread: CPU <= wall (up to clock granularity)
    assert rec.durations["idle"] >= 0.15 and rec.cpu["idle"] < 0.05  # sleeping costs no CPU


def test_cpu_mean_is_cpu_seconds_over_wall_seconds_not_a_mean_of_samples():
    # 0.3 CPU s of work then 0.3 s asleep: the first samples see a busy core, the last ones
    # an idle one; only the time-weighted figure is right whatever the sample boundaries.
    w0, c0 = time.perf_counter(), time.process_time()
    with ResourceSampler(0.25) as s:
        _spin(0.3)
        time.sleep(0.3)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    summary = s.summary()
    tick = 0.02  # psutil reads the kernel's accounting in clock ticks (10 ms); process_time is finer
    assert 0.3 - tick <= summary["cpu_s"] <= cpu + tick
    assert summary["cpu_mean_pct"] == pytest.approx(100 * summary["cpu_s"] / wall, rel=0.05)
    assert summary["cpu_mean_pct"] < 75  # about 50: half the span spun, half slept


def test_resource_sampler_sees_a_busy_thread():
    seen = []
    with ResourceSampler(0.05, on_sample=seen.append) as s:
        end = time.perf_counter() + 0.4
        while time.perf_counter() < end:
            pass
    summary = s.summary()
    assert len(s.samples) >= 4 and seen == s.samples
    assert summary["rss_peak_bytes"] > 10e6
    assert summary["cpu_max_pct"] > 50  # one core was busy
    with pytest.raises(ValueError):
        ResourceSampler(0)


# -- spool ------------------------------------------------------------------------------


def _event(kind="train", mid="m1", start=0.0, dur=1.0, **values):
    return ev.Event(kind, start, dur, node_id=1, run_id=7, message_id=mid, values=values)


def test_spool_delivers_each_event_once_across_processes(tmp_path):
    a, b = Spool(tmp_path / "s.sqlite"), Spool(tmp_path / "s.sqlite")  # two connections, like two processes
    assert a.spool_id == b.spool_id
    for i in range(3):
        a.add(_event(mid=f"m{i}"))
    sending = a.claim(SENDING)
    assert [e.message_id for e in sending] == ["m0", "m1", "m2"] and b.claim(REPLY) == []
    a.release([sending[0].seq])  # delivery of the first failed
    a.mark([e.seq for e in sending[1:]], TELEMETRY)
    (again,) = b.claim(REPLY)
    assert again.message_id == "m0" and again.key == sending[0].key
    assert a.pending() == 0


def test_spool_takes_flowers_uint64_ids(tmp_path):
    s = Spool(tmp_path / "s.sqlite")
    big = _event()
    big.run_id, big.node_id = 2**64 - 1, 2**64 - 2
    s.add(big)
    (back,) = s.claim(REPLY, run_id=2**64 - 1)
    assert back.run_id == 2**64 - 1 and back.node_id == 2**64 - 2


def test_spool_recover_releases_a_dead_senders_claims(tmp_path):
    s = Spool(tmp_path / "s.sqlite")
    s.add(_event())
    assert len(s.claim(SENDING)) == 1 and s.pending() == 0
    s.recover()
    assert s.pending() == 1


# -- telemetry service -------------------------------------------------------------------


def test_sender_streams_to_collector_and_falls_back_when_it_is_gone(tmp_path):
    from measurements.auth import TelemetryAuth

    spool = Spool(tmp_path / "s.sqlite")
    auth = TelemetryAuth(7)
    store = TelemetryStore(run_id=7, auth=auth)
    spool.set_key(7, auth.key_for(5))  # as the ClientApp mod does with the key of a message
    auth.note_sent("m1", 5)
    with TelemetryCollector("127.0.0.1:0", store) as collector:
        assert collector.port
        sender = TelemetrySender(spool, f"127.0.0.1:{collector.port}", node_id=lambda: 5, interval=3600)
        sender.start()
        spool.add(dataclasses.replace(_event(mid="m1"), node_id=0))  # the sender fills in its node
        sender.send_once()
        got = {e.kind: (e, via) for e, via in store.events()}
        assert got["train"][1] == "telemetry" and got["train"][0].message_id == "m1"
        clock = store.clock()[5]  # node id filled in by the sender
        assert abs(clock.values["offset_s"]) < 0.05 and clock.values["rtt_s"] >= 0
    assert not store.refused
    # collector stopped: nothing is lost, the events wait for a reply
    spool.add(_event(mid="m2"))
    assert sender.send_once() == 0
    assert [e.message_id for e in spool.claim(REPLY)] == ["m2"]
    sender.stop()


def test_store_deduplicates_across_paths_and_drops_other_runs():
    store = TelemetryStore(run_id=7)
    e = _event()
    e.spool_id, e.seq = "s", 1
    store.add([e], "telemetry")
    store.add([e], "reply")
    other = _event()
    other.spool_id, other.seq, other.run_id = "s", 2, 8
    store.add([other], "reply")
    assert store.events() == [(e, "telemetry")]


# -- clients.csv arithmetic ----------------------------------------------------------


def test_client_rows_split_the_round_trip_by_hand():
    # server: sent at 100.0, reply pulled at 110.0 (server clock)
    sent = [SentMessage("m1", 5, "train", "1", 100.0, payload_bytes=1000, received_unix_s=110.0, reply_payload_bytes=300)]
    # node clock is 2 s behind the server's (offset +2)
    down = ev.Event("downlink", 99.0, 0.5, node_id=5, message_id="m1", values={"bytes": 1100, "setup_s": 0.0, "rpcs": 9, "retries": 2},
                    labels={"transport": "stamen-supernode"})
    phases = {"load_s": 1.0, "loop_s": 4.5, "serialize_s": 0.1, "cpu_s": 9.5, "load_cpu_s": 0.5, "loop_cpu_s": 9.0}
    train = ev.Event("train", 100.0, 6.0, node_id=5, message_id="m1", values=phases)
    up = ev.Event("uplink", 106.5, 0.5, node_id=5, message_id="m1", values={"bytes": 400, "rpcs": 7})
    clock = ev.Event("clock", 50.0, 0.001, node_id=5, values={"offset_s": 2.0, "rtt_s": 0.001})
    events = [(down, "telemetry"), (train, "reply"), (up, "telemetry"), (clock, "telemetry")]
    (row,) = client_rows(sent, events, {5: {"device-class": "jetson", "network": "wifi"}})
    assert row["round"] == 1 and row["status"] == "ok" and row["device_class"] == "jetson" and row["network"] == "wifi"
    assert row["e2e_s"] == 10.0 and row["downlink_s"] == 0.5 and row["train_s"] == 6.0 and row["uplink_s"] == 0.5
    assert row["wait_s"] == pytest.approx(3.0)  # 10 - 0.5 - 6 - 0.5
    assert row["queue_s"] == pytest.approx(1.0)  # node pulls at 99 + 2 = 101 on the server clock
    assert row["reply_wait_s"] == pytest.approx(1.0)  # uplink ends at 107 + 2 = 109; pulled at 110
    assert row["bytes_down"] == 1100 and row["bytes_up"] == 400 and row["payload_up_bytes"] == 300
    assert row["rpcs_down"] == 9 and row["rpcs_up"] == 7 and row["pull_retries"] == 2
    assert row["transfer_via"] == "telemetry" and row["phases_via"] == "reply"
    assert row["train_cpu_s"] == 9.5 and row["loop_cpu_s"] == 9.0 and row["serialize_cpu_s"] is None  # not recorded


def test_client_rows_without_transfer_timing_leave_transfers_blank():
    sent = [
        SentMessage("m1", 5, "train", "2", 0.0, 10, received_unix_s=4.0),
        SentMessage("m2", 6, "train", "2", 0.0, 10),  # never replied
        SentMessage("q1", 5, "query", "", 0.0, 0, received_unix_s=1.0),  # not a training message
    ]
    train = ev.Event("train", 0.0, 3.0, node_id=5, message_id="m1", labels={"transport": "flower-supernode"})
    rows = client_rows(sent, [(train, "reply")])
    assert [(r["node_id"], r["status"]) for r in rows] == [(5, "ok"), (6, "late")]
    ok, late = rows
    assert ok["transfer_via"] == "unavailable" and "downlink_s" not in ok and "wait_s" not in ok
    assert late["transfer_via"] == "missing" and late["phases_via"] == "missing" and late["e2e_s"] is None


def test_resource_rows_are_relative_to_the_handler_start():
    sent = [SentMessage("m1", 5, "train", "1", 0.0, 10)]
    train = ev.Event("train", 100.0, 3.0, node_id=5, message_id="m1")
    samples = [ev.Event("sample", 100.0 + t, node_id=5, message_id="m1", values={"rss_bytes": 1e8, "cpu_pct": 99.0}) for t in (1.0, 0.5)]
    rows = resource_rows(sent, [(train, "reply"), *((s, "telemetry") for s in samples)])
    assert [r["t_s"] for r in rows] == [0.5, 1.0] and rows[0]["via"] == "telemetry" and rows[0]["round"] == 1


def test_gpu_sampling_tolerates_a_half_imported_torch(monkeypatch):
    """The sampler thread can run while the handler is still importing torch."""
    import sys
    import types

    from measurements import resources

    monkeypatch.setitem(sys.modules, "torch", types.ModuleType("torch"))  # no `cuda` attribute yet
    assert resources.gpu_memory_bytes() is None
    assert resources.gpu_peak_memory_bytes() is None
