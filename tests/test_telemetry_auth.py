"""Authenticated telemetry (measurements/auth.py): the collector keeps only what a node of
this run signed for itself about a message the server sent it, within a budget; forged
reports and floods arrive over the real gRPC service on loopback."""

import subprocess
from pathlib import Path

import grpc
import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from measurements import auth as au
from measurements import events as ev
from measurements.auth import EVENT_BUDGET, SAMPLE_BUDGET, TelemetryAuth
from measurements.grid import TimingGrid
from measurements.spool import REPLY, Spool
from measurements.telemetry import TelemetryCollector, TelemetrySender, TelemetryStore
from stamen import keys

RUN, HONEST, OTHER = 7, 5, 6
ROOT = Path(__file__).resolve().parent.parent


def train_event(node=HONEST, message="m1", train_s=6.0, seq=1, spool="honest", run=RUN):
    return ev.Event("train", 100.0, train_s, node_id=node, run_id=run, message_id=message, seq=seq, spool_id=spool)


def stream(port, events, *, root_certificates=None):
    from stamen_telemetry import telemetry_pb2_grpc

    channel = grpc.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(root_certificates)) if root_certificates \
        else grpc.insecure_channel(f"127.0.0.1:{port}")
    with channel:
        return telemetry_pb2_grpc.TelemetryStub(channel).Report(iter([e.to_proto() for e in events]), timeout=30.0)


@pytest.fixture()
def run_auth():
    auth = TelemetryAuth(RUN)
    auth.note_sent("m1", HONEST)
    auth.note_sent("m2", OTHER)
    return auth


def test_signatures_verify_only_with_the_nodes_own_key():
    secret = b"s" * 32
    e = train_event()
    au.sign(e, au.node_key(secret, RUN, HONEST))
    assert au.verify(e, au.node_key(secret, RUN, HONEST))
    assert not au.verify(e, au.node_key(secret, RUN, OTHER))  # another node's key
    assert not au.verify(e, au.node_key(secret, RUN + 1, HONEST))  # another run's key
    e.duration_s = 99999.0  # any field changed after signing
    assert not au.verify(e, au.node_key(secret, RUN, HONEST))


def test_a_signature_survives_the_trip_through_the_proto():
    """The transfer tracker records integer values (bytes, RPCs); the proto carries doubles."""
    key = au.node_key(b"s" * 32, RUN, HONEST)
    e = ev.Event("uplink", 100.0, 1, node_id=HONEST, run_id=RUN, message_id="m1", values={"bytes": 1100, "rpcs": 7},
                 labels={"transport": "stamen-supernode"}, seq=3, spool_id="x")
    au.sign(e, key)
    assert au.verify(ev.Event.from_proto(e.to_proto()), key)


def test_forged_reports_that_arrive_first_are_refused_and_the_real_one_is_kept(tmp_path, run_auth):
    """Another node of the run (it holds a key of its own) and a stranger try, before the
    honest node reports: an event in the honest node's name, with its spool id and
    sequence number, unsigned or signed with the attacker's key; an event about a message
    the attacker was not sent; events of run 0 and of another run. Without the checks the
    first of them would have taken the honest event's place in clients.csv."""
    store = TelemetryStore(run_id=RUN, auth=run_auth)
    attacker_key, honest_key = run_auth.key_for(OTHER), run_auth.key_for(HONEST)
    unsigned = train_event(train_s=99999.0)
    wrong_key = train_event(train_s=99999.0)
    au.sign(wrong_key, attacker_key)
    not_its_message = train_event(node=OTHER, train_s=99999.0, spool="attacker")
    au.sign(not_its_message, attacker_key)
    run_zero, other_run = train_event(run=0, train_s=99999.0), train_event(run=RUN + 1, train_s=99999.0)
    for e in (run_zero, other_run):
        au.sign(e, honest_key)  # even with a key of the right node
    with TelemetryCollector("127.0.0.1:0", store) as collector:
        stream(collector.port, [unsigned, wrong_key, not_its_message, run_zero, other_run])
        spool = Spool(tmp_path / "honest.sqlite")
        spool.set_key(RUN, honest_key)
        spool.add(train_event(seq=0, spool=""))
        sender = TelemetrySender(spool, f"127.0.0.1:{collector.port}", node_id=lambda: HONEST, interval=3600, probes=1)
        sender.start()
        assert sender.send_once() >= 1
        sender.stop()
    trains = [e for e, _ in store.events("train")]
    assert [(e.node_id, e.duration_s) for e in trains] == [(HONEST, 6.0)]
    reasons = {reason for _, reason in store.refused}
    assert any("signature" in r for r in reasons) and any("not sent to node 6" in r for r in reasons)
    assert any("run 0" in r for r in reasons) and any(f"run {RUN + 1}" in r for r in reasons)


def test_a_flood_costs_bounded_memory(run_auth):
    """20,000 unsigned events keep nothing. Of one node's genuine events about its own
    message, 5,000 samples keep the sample budget's worth, and 400 events of 50 invented
    kinds keep one small budget between them."""
    store = TelemetryStore(run_id=RUN, auth=run_auth)
    key = run_auth.key_for(OTHER)
    junk = [train_event(node=OTHER, message="m2", seq=i, spool="junk") for i in range(20_000)]
    samples = [ev.Event("sample", 100.0 + i, node_id=OTHER, run_id=RUN, message_id="m2", seq=i, spool_id="flood") for i in range(5_000)]
    invented = [ev.Event(f"kind{i % 50}", 100.0, node_id=OTHER, run_id=RUN, message_id="m2", seq=i, spool_id="kinds") for i in range(400)]
    for e in samples + invented:
        au.sign(e, key)
    with TelemetryCollector("127.0.0.1:0", store) as collector:
        stream(collector.port, junk)
        stream(collector.port, samples)
        stream(collector.port, invented)
    assert len(store.events("sample")) == SAMPLE_BUDGET
    assert len(store.events()) == SAMPLE_BUDGET + EVENT_BUDGET
    assert store.refused[(OTHER, "its signature does not verify")] == 20_000


def test_a_long_round_keeps_its_samples_and_its_train_event(run_auth):
    """A handler of 10 minutes at 0.5 s per sample makes 1,200 samples; its train event comes
    after them."""
    store = TelemetryStore(run_id=RUN, auth=run_auth)
    key = run_auth.key_for(HONEST)
    events = [ev.Event("sample", 100.0 + i / 2, node_id=HONEST, run_id=RUN, message_id="m1", seq=i, spool_id="s") for i in range(1_200)]
    events.append(train_event(train_s=600.0, seq=1_200, spool="s"))
    for e in events:
        au.sign(e, key)
    store.add(events, "telemetry")
    assert len(store.events("sample")) == 1_200 and [e.duration_s for e, _ in store.events("train")] == [600.0]
    assert not store.refused


def test_a_reply_speaks_only_for_the_node_that_sent_it(run_auth):
    store = TelemetryStore(run_id=RUN, auth=run_auth)
    mine, theirs = train_event(node=0, seq=1), train_event(node=OTHER, seq=2)  # node 0: the server fills in the sender
    store.add([mine, theirs], "reply", sender=HONEST)
    assert [(e.node_id, e.run_id) for e, _ in store.events()] == [(HONEST, RUN)]
    assert store.refused[(HONEST, f"events of node {OTHER} in its reply")] == 1


def test_every_message_the_server_sends_carries_its_nodes_key(flower_identity, run_auth):
    class Grid:
        def push_messages(self, messages):
            return [f"id-{m.metadata.dst_node_id}" for m in messages]

    grid = TimingGrid(Grid(), auth=run_auth)
    shared = RecordDict({keys.CONFIG: ConfigRecord()})  # as Flower's FedAvg builds them: one content for all
    messages = [Message(shared, dst_node_id=n, message_type="train") for n in (HONEST, OTHER)]
    grid.push_messages(messages)
    for m in messages:
        assert m.content.config_records[keys.TELEMETRY_AUTH][keys.TELEMETRY_KEY] == run_auth.key_for(m.metadata.dst_node_id)
    assert run_auth.owner["id-5"] == HONEST and run_auth.owner["id-6"] == OTHER


def test_events_of_a_run_without_a_key_wait_for_a_reply(tmp_path):
    spool = Spool(tmp_path / "s.sqlite")
    spool.add(train_event(seq=0, spool=""))
    sender = TelemetrySender(spool, "127.0.0.1:1", node_id=lambda: HONEST)
    assert sender.claim_signed() == []
    assert len(spool.claim(REPLY)) == 1  # the ClientApp mod puts it in the next reply


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    out = tmp_path_factory.mktemp("tls")
    subprocess.run(["sh", str(ROOT / "deploy" / "tls" / "generate.sh"), str(out), "1"], check=True, capture_output=True, timeout=120)
    return out


def test_under_tls_the_collector_serves_the_superlinks_certificate(certs, run_auth, tmp_path):
    store = TelemetryStore(run_id=RUN, auth=run_auth)
    e = train_event()
    au.sign(e, run_auth.key_for(HONEST))
    with TelemetryCollector("127.0.0.1:0", store, certfile=str(certs / "server.pem"), keyfile=str(certs / "server.key")) as collector:
        with pytest.raises(grpc.RpcError):  # a plaintext client cannot talk to it
            stream(collector.port, [e])
        stream(collector.port, [e], root_certificates=(certs / "ca.crt").read_bytes())  # a node trusting the SuperLink's CA
    assert [x.duration_s for x, _ in store.events()] == [6.0]


def test_another_node_cannot_take_an_events_place_by_reusing_its_spool_id_and_sequence(run_auth):
    store = TelemetryStore(run_id=RUN, auth=run_auth)
    squatter = train_event(node=OTHER, message="m2", seq=1, spool="honest", train_s=99999.0)  # its own, genuine, about m2
    store.add([squatter], "reply", sender=OTHER)
    honest = train_event(seq=1, spool="honest")
    au.sign(honest, run_auth.key_for(HONEST))
    store.add([honest], "telemetry")
    assert sorted((e.node_id, e.duration_s) for e, _ in store.events()) == [(HONEST, 6.0), (OTHER, 99999.0)]
