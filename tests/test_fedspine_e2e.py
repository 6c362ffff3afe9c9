"""FedSpine end to end on loopback: a real flower-superlink and two stamen-supernodes
(transfer timing on; shared with other methods' tests), MiniLM on BBC News, 2 rounds with
arms (ratio 0 | 0.5, rank 4): the nodes prune for real, the bandits are rewarded from the
measured round times."""

import csv
import json

import pytest

pytestmark = pytest.mark.integration


def test_fedspine_on_loopback(tmp_path, two_loopback_nodes, small_run):
    overrides = (
        small_run + ' strategy.name="fedspine" fedspine.ratios="0 0.5" fedspine.ranks="4" '
        f'output.dir="{tmp_path}"'
    )
    run_id = two_loopback_nodes.run([overrides], echo=lambda line: None, timeout=600)
    run = tmp_path / str(run_id)
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [r["round"] for r in rows] == ["0", "1", "2"] and all(r["dropped"] == "0" for r in rows[1:])
    arms = list(csv.DictReader(open(run / "arms.csv")))
    assert len(arms) == 4 and {a["ratio"] for a in arms if a["round"] == "2"} == {"0.5"}  # untried arm in round 2
    assert all(a["reward"] != "" and float(a["round_time_s"]) > 0 for a in arms)  # measured and rewarded
    clients = {(r["round"], r["node_id"]): r for r in csv.DictReader(open(run / "clients.csv"))}
    pruned_up = [int(clients[("2", a["node_id"])]["payload_up_bytes"]) for a in arms if a["round"] == "2"]
    dense_up = [int(clients[("1", a["node_id"])]["payload_up_bytes"]) for a in arms if a["round"] == "1"]
    assert max(pruned_up) < min(dense_up)  # half the heads: smaller B factors in the reply
    state = json.loads((run / "bandit_state.json").read_text())
    assert len(state["nodes"]) == 2 and all(b["pulls"] == [1, 1] for b in state["nodes"].values())
