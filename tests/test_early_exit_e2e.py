"""ReeFL end to end on loopback, under local DP-SGD: a real flower-superlink and two
stamen-supernodes, one claiming max exit 1 (2 of 8 ViT blocks), the other the full
depth; digits, 2 rounds, a target epsilon.

One run checks two things (a loopback run costs the suite about 100 s):

* ReeFL's plumbing: each depth is sent, trains and returns its part of the model, and
  the global model moves everywhere. (A ViT from scratch needs a few hundred steps
  before its accuracy leaves chance, so accuracy is the study's business, not this
  test's.)
* Local DP: each node's spending accumulates across rounds in its SuperNode's node
  state, and what the run's privacy.csv says is what a fresh Opacus accountant says.

Without DP the same path runs minus Opacus; tests/test_early_exit.py trains it."""

import csv

import numpy as np
import pytest

pytestmark = pytest.mark.integration

VIT = "vit:image_size=8,patch_size=2,num_channels=1,hidden_size=32,num_hidden_layers=8,num_attention_heads=2,intermediate_size=64"


def test_private_reefl_with_a_shallow_and_a_deep_node(tmp_path, two_loopback_nodes):
    overrides = (
        f'strategy.name="reefl" model.task="image-classification" model.path="{VIT}" data.name="digits" '
        f'early-exit.tuning="full" strategy.num-rounds=2 train.local-steps=5 train.batch-size=16 '
        f'dp.mode="local" dp.epsilon=3.0 dp.delta=1e-5 output.dir="{tmp_path}"'
    )
    run_id = two_loopback_nodes.run([overrides], echo=lambda line: None, timeout=600)
    run = tmp_path / str(run_id)
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [r["round"] for r in rows] == ["0", "1", "2"]
    for r in rows[1:]:
        assert r["num_clients"] == "2" and r["dropped"] == "0" and r["skipped"] == "0"
        for j in range(1, 5):
            assert 0.0 <= float(r[f"eval_accuracy_exit{j}"]) <= 1.0
        assert float(r["eval_blocks_at_0.5"]) <= 1.0

    clients = [r for r in csv.DictReader(open(run / "clients.csv")) if r["status"] == "ok"]
    assert len(clients) == 4
    up = {r["device_class"]: int(r["payload_up_bytes"]) for r in clients if r["round"] == "2"}
    assert up["raspberry-pi"] < up["nvidia-gpu"] / 2  # the shallow node holds 2 of 8 blocks

    # the global model moved from the initial one everywhere: the blocks both nodes hold,
    # the block only the deep node holds, and the shared module and head
    from ml.early_exit import build_model
    from ml.tasks import ImageClassification

    initial = build_model(ImageClassification(VIT, num_labels=10), exit_kind="ree", tuning="full", seed=0).trainable_state()
    final = np.load(run / "global_model.npz")
    assert set(final.files) == set(initial)
    for name in ("backbone.layers.0.attention.q_proj.weight", "backbone.layers.7.attention.q_proj.weight", "ree.attention.qkv.weight", "head.linear.weight"):
        assert not np.allclose(final[name], initial[name]), f"{name} did not change"

    # the privacy ledger: cumulative in the node state, a fresh accountant's epsilon
    from opacus.accountants import RDPAccountant

    privacy = list(csv.DictReader(open(run / "privacy.csv")))
    assert sorted((r["round"], r["status"]) for r in privacy) == [("1", "trained")] * 2 + [("2", "trained")] * 2
    by_node = {}
    for r in privacy:
        by_node.setdefault(r["node_id"], []).append(r)
    assert len(by_node) == 2
    for node_rows in by_node.values():
        first, second = sorted(node_rows, key=lambda r: int(r["round"]))
        assert int(first["steps"]) == 5 and int(second["steps"]) == 10  # the node state kept round 1's spending
        accountant = RDPAccountant()
        accountant.history = [(float(second["noise_multiplier"]), float(second["sample_rate"]), 10)]
        assert float(second["epsilon"]) == pytest.approx(accountant.get_epsilon(delta=1e-5), rel=1e-5)  # the CSV keeps 6 digits
        assert float(first["epsilon"]) < float(second["epsilon"]) <= 3.0 * 1.01  # the noise was planned for 2 rounds
