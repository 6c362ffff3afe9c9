"""Local DP-SGD end to end on loopback: a real flower-superlink and two stamen-supernodes
(shared with other methods' tests), FLoRA with MiniLM on BBC News, 2 rounds, a target
epsilon: each node's spending accumulates across rounds in its node state, and what the
run's privacy.csv says is what a fresh Opacus accountant says."""

import csv

import pytest

pytestmark = pytest.mark.integration


def test_local_dp_on_loopback(tmp_path, two_loopback_nodes, small_run):
    from opacus.accountants import RDPAccountant

    overrides = small_run + f' strategy.name="flora" dp.mode="local" dp.epsilon=3.0 dp.delta=1e-5 output.dir="{tmp_path}"'
    run_id = two_loopback_nodes.run([overrides], echo=lambda line: None, timeout=600)
    run = tmp_path / str(run_id)
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [r["round"] for r in rows] == ["0", "1", "2"] and all(r["num_clients"] == "2" for r in rows[1:])
    privacy = list(csv.DictReader(open(run / "privacy.csv")))
    assert sorted((r["round"], r["status"]) for r in privacy) == [("1", "trained")] * 2 + [("2", "trained")] * 2
    by_node = {}
    for r in privacy:
        by_node.setdefault(r["node_id"], []).append(r)
    assert len(by_node) == 2
    for node_rows in by_node.values():
        first, second = sorted(node_rows, key=lambda r: int(r["round"]))
        steps = int(first["steps"])
        assert int(second["steps"]) == 2 * steps  # cumulative: the node state kept round 1's spending
        accountant = RDPAccountant()
        accountant.history = [(float(second["noise_multiplier"]), float(second["sample_rate"]), 2 * steps)]
        assert float(second["epsilon"]) == pytest.approx(accountant.get_epsilon(delta=1e-5), rel=1e-5)  # the CSV keeps 6 digits
        assert float(first["epsilon"]) < float(second["epsilon"]) <= 3.0 * 1.01  # the noise was planned for 2 rounds
