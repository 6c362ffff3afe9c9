"""FedSpine end to end on loopback: a real flower-superlink and two stamen-supernodes
(transfer timing on, the warm runtime; shared with other methods' tests), MiniLM on BBC
News, 2 rounds with arms (ratio 0.5 | 0, rank 4): the nodes prune for real in round 1 and
not in round 2, the bandits are rewarded from the measured round times. Pruning changes
the model in place, so round 2 also shows that a warm worker's changes die with it."""

import csv
import json
import re

import pytest

pytestmark = pytest.mark.integration


def test_fedspine_on_loopback(tmp_path, two_loopback_nodes, small_run):
    overrides = (
        small_run + ' strategy.name="fedspine" fedspine.ratios="0.5 0" fedspine.ranks="4" '
        f'output.dir="{tmp_path}"'
    )
    run_id = two_loopback_nodes.run([overrides], echo=lambda line: None, timeout=600)
    run = tmp_path / str(run_id)
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [r["round"] for r in rows] == ["0", "1", "2"] and all(r["dropped"] == "0" for r in rows[1:])
    arms = list(csv.DictReader(open(run / "arms.csv")))
    assert {a["ratio"] for a in arms if a["round"] == "1"} == {"0.5"}  # the first arm, tried first
    assert len(arms) == 4 and {a["ratio"] for a in arms if a["round"] == "2"} == {"0"}  # the untried arm in round 2
    assert all(a["reward"] != "" and float(a["round_time_s"]) > 0 for a in arms)  # measured and rewarded
    clients = {(r["round"], r["node_id"]): r for r in csv.DictReader(open(run / "clients.csv"))}
    pruned_up = [int(clients[("1", a["node_id"])]["payload_up_bytes"]) for a in arms if a["round"] == "1"]
    dense_up = [int(clients[("2", a["node_id"])]["payload_up_bytes"]) for a in arms if a["round"] == "2"]
    # half the heads: smaller B factors in the reply; and round 2 trains the whole model
    # again, though round 1's worker pruned its copy in place
    assert max(pruned_up) < min(dense_up)
    assert {r["start"] for r in clients.values()} == {"warm"}
    state = json.loads((run / "bandit_state.json").read_text())
    assert len(state["nodes"]) == 2 and all(b["pulls"] == [1, 1] for b in state["nodes"].values())


def test_each_run_gets_its_own_executor(two_loopback_nodes):
    """Every run on these shared nodes was preloaded by an executor of its own: a task of
    a new run replaces the executor bound to the old one (run after other e2e tests,
    this checks what they left in the node logs)."""
    log = (two_loopback_nodes.workdir / "supernode-0.log").read_text()
    runs = re.findall(r"run (\d+): preloaded", log)
    assert runs, "no warm run on these nodes"
    assert len(runs) == len(set(runs))  # one preload per run
    assert log.count("replacing the executor bound to run") == len(runs) - 1
