"""A SuperNode that crashes mid-run and comes back, on loopback: a real flower-superlink
and two stamen-supernodes, local DP-SGD, 3 rounds of a tiny ReeFL ViT on digits.

Node 0 is killed (SIGKILL, as a crash or a power cut) as round 2 starts, and started
again with the same node-config and disk. Flower gives it a new node id and an empty
``context.state``. The privacy ledger on its disk (client_app/privacy.py:LedgerFile) is
what lets it continue at the epsilon it had spent; without it the node would report 2
steps in round 3, as if it had never trained, and the server could not tell (a new node
id has no history there)."""

import csv
import json
import threading

import pytest

pytestmark = pytest.mark.integration

VIT = "vit:image_size=8,patch_size=4,num_channels=1,hidden_size=16,num_hidden_layers=4,num_attention_heads=2,intermediate_size=32"


def test_a_restarted_supernode_continues_at_its_spent_epsilon(tmp_path, flower_programs):
    from deploy.local import LocalDeployment, NodeSpec

    nodes = [NodeSpec(i, 2, device_class="raspberry-pi", num_threads=1) for i in range(2)]
    overrides = (
        f'strategy.name="reefl" model.task="image-classification" model.path="{VIT}" data.name="digits" '
        f'early-exit.tuning="full" strategy.num-rounds=3 train.local-steps=2 train.batch-size=16 '
        f'strategy.round-timeout=12.0 eval.max-examples=32 '
        f'dp.mode="local" dp.noise-multiplier=1.0 dp.delta=1e-5 output.dir="{tmp_path}"'
    )
    with LocalDeployment(nodes, workdir=tmp_path / "_deploy") as dep:
        restarted = threading.Event()

        def watch(line: str) -> None:  # the ServerApp's log, streamed by `flwr run`
            if "[ROUND 2" in line and not restarted.is_set():
                dep.stop_node(0)  # SIGKILL: it says no goodbye
                dep.start_node(0)
                restarted.set()

        run_id = dep.run([overrides], echo=watch, timeout=600)
    assert restarted.is_set()

    run = tmp_path / str(run_id)
    privacy = list(csv.DictReader(open(run / "privacy.csv")))
    first = {r["node_id"] for r in privacy if r["round"] == "1"}
    last = {r["node_id"]: r for r in privacy if r["round"] == "3"}
    assert len(first) == 2 and len(last) == 2, privacy
    (new_id,) = set(last) - first  # node 0 came back under a new id
    (kept_id,) = set(last) & first

    # the restarted node was profiled when it came back: it has its own entry, and its depth
    profiles = json.loads((run / "profiles.json").read_text())
    assert profiles[new_id]["device-class"] == "raspberry-pi" and profiles[new_id]["partition-id"] == 0

    ledger = json.loads((tmp_path / "_deploy" / "supernode-0" / "stamen-state" / "dp-ledger" / f"run-{run_id}" / "partition-0.json").read_text())
    spent = sum(int(s) for _, _, s in ledger["history"])
    assert int(last[new_id]["steps"]) == spent >= 4  # round 1's 2 steps (and round 2's, had it trained) and round 3's
    assert int(last[kept_id]["steps"]) == 6
    first_epsilon = {r["node_id"]: float(r["epsilon"]) for r in privacy if r["round"] == "1"}
    assert float(last[new_id]["epsilon"]) > max(first_epsilon.values())
    assert all(r["status"] == "trained" for r in privacy)
