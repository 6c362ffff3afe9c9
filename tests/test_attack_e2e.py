"""A malicious node and a dead one on loopback: a real flower-superlink and four
stamen-supernodes, with the default round timeout.

- Node 2 runs with tests/attacks/sitecustomize.py loaded into its ClientApp processes:
  it scales its LoRA update by 1e4 and claims 10^9 examples, in its replies and in its
  device profile. It must be marked in clients.csv and rounds.csv, and the global model
  must move by no more than the rounds' bounds allow.
- Node 3 crashes, SuperNode and all (SIGKILL to its process group, from the same
  test-only module), when its round-2 instruction arrives, before it replies. Flower's
  SuperLink answers for it once its heartbeat is overdue ("Node Unavailable", about a
  minute later), and that error must be booked to node 3, not to the SuperLink (node 1),
  and counted once.

The run must finish, and metrics.csv, rounds.csv and clients.csv must agree."""

import csv
import re
import signal
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.integration

ATTACKS = Path(__file__).resolve().parent / "attacks"


def test_a_bad_node_is_bounded_and_a_dead_one_is_booked_to_itself(tmp_path, flower_programs, tiny_bert):
    from deploy.local import LocalDeployment, NodeSpec
    from ml.model import adapted_weights, load_model, target_module_names

    attacker = NodeSpec(2, 4, device_class="cpu", num_threads=1,
                        env={"PYTHONPATH": str(ATTACKS), "STAMEN_TEST_ATTACK": "scale=1e4,num-examples=1e9,profile"})
    doomed = NodeSpec(3, 4, device_class="cpu", num_threads=1, env={"PYTHONPATH": str(ATTACKS), "STAMEN_TEST_ATTACK": "die-at-round=2"})
    nodes = [NodeSpec(0, 4, device_class="cpu", num_threads=1), NodeSpec(1, 4, device_class="cpu", num_threads=1), attacker, doomed]
    overrides = (
        f'model.path="{tiny_bert}" model.max-seq-len=32 strategy.num-rounds=2 strategy.min-nodes=3 train.local-steps=2 '
        f'train.batch-size=4 eval.max-examples=32 output.dir="{tmp_path}"'  # the default round timeout: 600 s
    )
    with LocalDeployment(nodes, workdir=tmp_path / "_deploy") as dep:
        run_id = dep.run([overrides], timeout=600)
        assert dep._node_procs[3].poll() == -signal.SIGKILL  # node 3 did crash, in round 2
    run = tmp_path / str(run_id)

    clients = list(csv.DictReader(open(run / "clients.csv")))
    rounds = list(csv.DictReader(open(run / "rounds.csv")))
    metrics = list(csv.DictReader(open(run / "metrics.csv")))
    assert len(rounds) == 2 and metrics[-1]["round"] == "2"  # the run finished
    bad = [r for r in clients if "over the bound" in r["reason"]]
    assert len(bad) == 2 and {r["status"] for r in bad} == {"clipped"}, clients  # the attacker, in both rounds
    assert len({r["node_id"] for r in bad}) == 1
    assert all("counted as" in r["reason"] for r in bad)  # its claim of 10^9 was not its weight
    dead = [r for r in clients if r["status"] == "error"]
    assert len(dead) == 1 and dead[0]["round"] == "2" and "Node Unavailable" in dead[0]["reason"], clients
    assert dead[0]["node_id"] != "1" and dead[0]["node_id"] in {r["node_id"] for r in clients if r["round"] == "1"}
    assert all(r["status"] == "ok" for r in clients if r not in bad and r not in dead)
    assert [r["nodes_clipped"] for r in rounds] == ["1", "1"] and [r["participants"] for r in rounds] == ["4", "3"]
    assert [r["nodes_error"] for r in rounds] == ["0", "1"] and [r["nodes_late"] for r in rounds] == ["0", "0"]
    assert [(m["num_clients"], m["dropped"]) for m in metrics if m["round"] != "0"] == [("4", "0"), ("3", "1")]

    # each round's update of the global model is a weighted mean of updates within that
    # round's bound, so the model moved by at most the sum of the bounds
    bounds = [float(re.search(r"over the bound ([0-9.e+]+)", r["reason"]).group(1)) for r in bad]
    model = load_model("text-classification", str(tiny_bert), num_labels=5)
    start = adapted_weights(model, target_module_names(model))
    final = dict(np.load(run / "global_model.npz"))
    moved = np.sqrt(sum(float(np.sum((final[k + ".weight"].astype(np.float64) - v) ** 2)) for k, v in start.items()))
    assert 0 < moved <= sum(bounds)
