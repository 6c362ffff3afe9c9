"""A malicious node on loopback: a real flower-superlink and three stamen-supernodes, one of
which runs with tests/attacks/sitecustomize.py loaded into its ClientApp processes. It
scales its LoRA update by 1e4 and claims 10^9 examples, in its replies and in its device
profile. The run must finish, the node must be marked in clients.csv and rounds.csv, and
the global model must move by no more than the rounds' bounds allow."""

import csv
import re
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.integration

ATTACKS = Path(__file__).resolve().parent / "attacks"


def test_a_node_that_sends_a_1e4_update_and_claims_1e9_examples_is_bounded(tmp_path, flower_programs, tiny_bert):
    from deploy.local import LocalDeployment, NodeSpec
    from ml.model import adapted_weights, load_model, target_module_names

    attacker = NodeSpec(2, 3, device_class="cpu", num_threads=1,
                        env={"PYTHONPATH": str(ATTACKS), "STAMEN_TEST_ATTACK": "scale=1e4,num-examples=1e9,profile"})
    nodes = [NodeSpec(0, 3, device_class="cpu", num_threads=1), NodeSpec(1, 3, device_class="cpu", num_threads=1), attacker]
    overrides = (
        f'model.path="{tiny_bert}" model.max-seq-len=32 strategy.num-rounds=2 strategy.min-nodes=3 train.local-steps=2 '
        f'train.batch-size=4 eval.max-examples=32 strategy.round-timeout=60.0 output.dir="{tmp_path}"'
    )
    with LocalDeployment(nodes, workdir=tmp_path / "_deploy") as dep:
        run_id = dep.run([overrides], timeout=600)
    run = tmp_path / str(run_id)

    clients = list(csv.DictReader(open(run / "clients.csv")))
    rounds = list(csv.DictReader(open(run / "rounds.csv")))
    metrics = list(csv.DictReader(open(run / "metrics.csv")))
    assert len(rounds) == 2 and metrics[-1]["round"] == "2"  # the run finished
    bad = [r for r in clients if "over the bound" in r["reason"]]
    assert len(bad) == 2 and {r["status"] for r in bad} == {"clipped"}, clients  # the attacker, in both rounds
    assert len({r["node_id"] for r in bad}) == 1
    assert all("counted as" in r["reason"] for r in bad)  # its claim of 10^9 was not its weight
    assert all(r["status"] == "ok" for r in clients if r not in bad)
    assert [r["nodes_clipped"] for r in rounds] == ["1", "1"] and [r["participants"] for r in rounds] == ["3", "3"]
    assert [m["num_clients"] for m in metrics if m["round"] != "0"] == ["3", "3"]

    # each round's update of the global model is a weighted mean of updates within that
    # round's bound, so the model moved by at most the sum of the bounds
    bounds = [float(re.search(r"over the bound ([0-9.e+]+)", r["reason"]).group(1)) for r in bad]
    model = load_model("text-classification", str(tiny_bert), num_labels=5)
    start = adapted_weights(model, target_module_names(model))
    final = dict(np.load(run / "global_model.npz"))
    moved = np.sqrt(sum(float(np.sum((final[k + ".weight"].astype(np.float64) - v) ** 2)) for k, v in start.items()))
    assert 0 < moved <= sum(bounds)
