"""The same app in Flower's simulation engine (`stamen simulate`): Ray runs the ClientApps,
so the instrumentation has no SuperNode transport to time. What it can measure must be
there; transfers must be marked unavailable, not invented."""

import csv

import pytest

from cli.main import main

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def simulated_run(tmp_path_factory, flower_programs, small_run):
    out = tmp_path_factory.mktemp("runs")
    code = main(["simulate", "--nodes", "3", "--output", str(out), "--run-config", small_run, "--timeout", "600"])
    assert code == 0, f"stamen simulate failed; logs under {out}/_deploy"
    (run_dir,) = [p for p in out.iterdir() if p.name != "_deploy"]
    return run_dir


def test_every_round_aggregates_every_virtual_node(simulated_run):
    rows = list(csv.DictReader(open(simulated_run / "metrics.csv")))
    assert [r["round"] for r in rows] == ["0", "1", "2"]
    for row in rows[1:]:
        assert row["num_clients"] == "3" and row["dropped"] == "0"
        assert row["global_rank"] == "24"  # three nodes of the default rank 8, stacked


def test_clients_csv_has_phases_but_no_invented_transfers(simulated_run):
    rows = list(csv.DictReader(open(simulated_run / "clients.csv")))
    assert sorted(r["round"] for r in rows) == ["1", "1", "1", "2", "2", "2"]
    assert len({r["node_id"] for r in rows}) == 3
    for r in rows:
        assert r["transport"] == "simulation" and r["status"] == "ok"
        assert r["transfer_via"] == "unavailable" and r["phases_via"] == "reply"
        assert r["downlink_s"] == r["uplink_s"] == r["wait_s"] == r["bytes_down"] == r["bytes_up"] == ""
        train = float(r["train_s"])
        assert 0 < float(r["load_s"]) + float(r["loop_s"]) + float(r["serialize_s"]) <= train + 1e-6
        assert float(r["e2e_s"]) >= train
        assert int(r["payload_down_bytes"]) > 0 and int(r["payload_up_bytes"]) > 0
        assert int(r["rss_peak_bytes"]) > 50e6


def test_rounds_and_resources_are_recorded(simulated_run):
    rounds = list(csv.DictReader(open(simulated_run / "rounds.csv")))
    assert [r["round"] for r in rounds] == ["1", "2"]
    for r in rounds:
        assert r["nodes_replied"] == "3" and 0 < float(r["aggregation_s"]) < float(r["round_s"])
    samples = list(csv.DictReader(open(simulated_run / "resources.csv")))
    assert len({s["node_id"] for s in samples}) == 3 and {s["via"] for s in samples} == {"reply"}


def test_report_runs_on_a_simulated_run(simulated_run):
    assert (simulated_run / "summary.json").is_file()
    assert (simulated_run / "phases_per_round.png").stat().st_size > 0
