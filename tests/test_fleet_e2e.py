"""Fleet scale end to end: 100 virtual nodes in Flower's simulation engine on a
simulated clock (a fifth sampled per round, the slow half late for the deadline), and a
run whose every node fails stops with a non-zero exit naming the error, on real
processes (loopback)."""

import csv
import json

import pytest

from cli.main import main

pytestmark = pytest.mark.integration

FLEET = "pi=50 gpu@5g=50"
DEADLINE = 5.0  # simulated seconds: a Pi trains 3 + 2 x (1.5 + 0.05 x 8) = 6.8 s (late), a GPU 1.1 s


@pytest.fixture(scope="module")
def latency_model(tmp_path_factory):
    from measurements.latency_model import DeviceModel, LatencyModel, LinkModel

    model = LatencyModel(
        devices={"pi": DeviceModel(startup_s=3.0, step_s=1.5, step_per_rank_s=0.05, wait_s=0.5),
                 "gpu": DeviceModel(startup_s=1.0, step_s=0.05, wait_s=0.5)},
        down={"wifi": LinkModel(latency_s=0.01, mbit=100.0), "5g": LinkModel(latency_s=0.05, mbit=265.8)},
        up={"wifi": LinkModel(latency_s=0.01, mbit=80.0), "5g": LinkModel(latency_s=0.05, mbit=14.56)},
        steps=2,
    )
    path = tmp_path_factory.mktemp("model") / "latency-model.json"
    model.save(path)
    return path, model


@pytest.fixture(scope="module")
def fleet_run(tmp_path_factory, flower_programs, tiny_bert, latency_model):
    out = tmp_path_factory.mktemp("runs")
    # 20 of 100 per round: all 20 on Pis (no reply in time, the run fails) has odds of 1e-6
    config = (f'model.path="{tiny_bert}" model.max-seq-len=32 strategy.num-rounds=2 strategy.fraction-train=0.2 '
              f'train.local-steps=2 train.batch-size=4 eval.max-examples=32 data.partitioner="iid" strategy.round-timeout={DEADLINE}')
    code = main(["simulate", "--latency-model", str(latency_model[0]), "--fleet", FLEET, "--output", str(out),
                 "--run-config", config, "--timeout", "600"])
    assert code == 0, f"stamen simulate failed; logs under {out}/_deploy"
    (run_dir,) = [p for p in out.iterdir() if p.name != "_deploy"]
    return run_dir


def test_a_hundred_virtual_nodes_train_a_sampled_fifth_per_round(fleet_run):
    profiles = json.loads((fleet_run / "profiles.json").read_text())
    assert len(profiles) == 100 and all(p["keeps-global"] is False for p in profiles.values())
    rounds = list(csv.DictReader(open(fleet_run / "rounds.csv")))
    assert [r["nodes_sent"] for r in rounds] == ["20", "20"] and {r["clock"] for r in rounds} == {"simulated"}


def test_every_phase_is_the_fleets_and_the_deadline_drops_the_slow(fleet_run, latency_model):
    _, model = latency_model
    rows = list(csv.DictReader(open(fleet_run / "clients.csv")))
    assert len(rows) == 40 and {r["clock"] for r in rows} == {"simulated"}
    for r in rows:
        device = r["device"]
        assert (device, r["network"]) in {("pi", "wifi"), ("gpu", "5g")}
        expected = model.phases(device, r["network"], steps=2, rank=int(r["lora_rank"]), prune=0.0,
                                bytes_down=int(r["payload_down_bytes"]), bytes_up=int(r["payload_up_bytes"]))
        assert float(r["e2e_s"]) == pytest.approx(expected["e2e_s"], abs=1e-3)  # (the CSV rounds)
        assert (r["status"], device) in {("late", "pi"), ("ok", "gpu")}, r  # a Pi misses the deadline; a GPU makes it
    metrics = list(csv.DictReader(open(fleet_run / "metrics.csv")))
    rounds = list(csv.DictReader(open(fleet_run / "rounds.csv")))
    for r, m in zip(rounds, metrics[1:], strict=True):
        ok = [c for c in rows if c["round"] == r["round"] and c["status"] == "ok"]
        late = [c for c in rows if c["round"] == r["round"] and c["status"] == "late"]
        assert int(m["num_clients"]) == len(ok) == int(r["participants"]) and int(r["nodes_late"]) == len(late)
        server = float(r["configure_s"]) + float(r["aggregation_s"])
        slowest = DEADLINE if late else max(float(c["e2e_s"]) for c in ok)  # a late node: the round waited for the deadline
        assert float(r["round_s"]) == pytest.approx(slowest + server, abs=1e-3)
    assert float(metrics[-1]["elapsed_s"]) == pytest.approx(sum(float(r["round_s"]) for r in rounds), abs=1e-3)


def test_what_the_host_measured_stays_and_no_transfer_is_invented(fleet_run):
    """Flower's simulation engine: the ClientApps run in Ray workers, there is no SuperNode
    transport to time. The clock's phases are marked simulated; what the worker measured
    (resources, payloads, the phases' path) stays; wire bytes, which no link carried, stay
    empty. (The measured clock's `transfer_via = unavailable` rows: tests/test_measurements.py.)"""
    rows = list(csv.DictReader(open(fleet_run / "clients.csv")))
    for r in rows:
        assert r["transport"] == "simulation" and r["phases_via"] == "reply"
        assert r["transfer_via"] == "simulated" and r["bytes_down"] == r["bytes_up"] == ""
        assert int(r["payload_down_bytes"]) > 0 and int(r["payload_up_bytes"]) > 0 and int(r["rss_peak_bytes"]) > 50e6
    samples = list(csv.DictReader(open(fleet_run / "resources.csv")))
    assert {s["via"] for s in samples} == {"reply"} and {s["node_id"] for s in samples} <= {r["node_id"] for r in rows}


def test_the_report_reads_a_simulated_run_and_says_so(fleet_run):
    assert (fleet_run / "summary.json").is_file() and (fleet_run / "phases_per_round.png").stat().st_size > 0
    from measurements.report import Run, format_summary, summarize

    assert "clock: simulated" in format_summary(summarize(Run.load(fleet_run)))


def test_a_round_no_node_served_fails_the_run(tmp_path, flower_programs, tiny_bert, capsys):
    """Every node's training raises (a device misconfigured: num-threads -1): the run
    stops after round 1 with exit 1 and the nodes' error, instead of 'completed'."""
    from cli.main import _run
    from deploy.local import LocalDeployment, NodeSpec, merge_overrides

    nodes = [NodeSpec(0, 1, extra={"num-threads": -1})]
    config = (f'model.path="{tiny_bert}" model.max-seq-len=32 strategy.num-rounds=3 train.local-steps=1 '
              f'eval.max-examples=16 strategy.min-nodes=1 output.dir="{tmp_path}"')
    overrides = merge_overrides([config])
    code, run_dir = _run(LocalDeployment(nodes, workdir=tmp_path / "_deploy"), overrides, tmp_path, tmp_path / "_deploy", 300)
    assert code == 1
    err = capsys.readouterr().err
    assert "RoundFailedError: round 1: 0 of 1 nodes replied without an error, fewer than strategy.min-replies = 1" in err
    assert "1 node (" in err and "set_num_threads expects a positive integer" in err
    clients = list(csv.DictReader(open(run_dir / "clients.csv")))
    assert [(r["round"], r["status"]) for r in clients] == [("1", "error")]  # booked; round 2 never ran
