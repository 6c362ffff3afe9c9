"""ReeFL end to end on loopback: a real flower-superlink and two stamen-supernodes, one
claiming max exit 1 (2 of 8 ViT blocks), the other the full depth; digits, 2 rounds.
(A ViT from scratch needs a few hundred steps before its accuracy leaves chance, so this
test checks what moved and what was sent, not accuracy; the study measures that.)"""

import csv

import numpy as np
import pytest

pytestmark = pytest.mark.integration

VIT = "vit:image_size=8,patch_size=2,num_channels=1,hidden_size=32,num_hidden_layers=8,num_attention_heads=2,intermediate_size=64"


def test_reefl_with_a_shallow_and_a_deep_node(tmp_path, two_loopback_nodes):
    overrides = (
        f'strategy.name="reefl" model.task="image-classification" model.path="{VIT}" data.name="digits" '
        f'early-exit.tuning="full" strategy.num-rounds=2 train.local-steps=5 train.batch-size=16 '
        f'output.dir="{tmp_path}"'
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
