"""Each heterogeneous-LoRA baseline end to end in Flower's simulation engine (the real
ClientApp, model and data): two rounds, so round 2 starts from the adapter the server
sent; ranks 4 and 8 by partition (fedit: 8 and 8)."""

import csv

import numpy as np
import pytest

from cli.main import main

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("name,ranks", [("fedit", "8"), ("hetlora", "4 8"), ("flexlora", "4 8")])
def test_two_rounds(tmp_path, name, ranks, flower_programs):
    overrides = (
        f'strategy.name="{name}" lora.rank-by-partition="{ranks}" strategy.num-rounds=2 train.local-steps=3 '
        "train.batch-size=4 model.max-seq-len=32 eval.max-examples=32 data.test-fraction=0.1 measure.enabled=false "
        "simulation.keep-global=true"  # two nodes: they keep the weights, as devices do (docs/scale.md)
    )
    assert main(["simulate", "--nodes", "2", "--output", str(tmp_path), "--run-config", overrides, "--timeout", "600"]) == 0
    (run_dir,) = [p for p in tmp_path.iterdir() if p.name != "_deploy"]
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert [r["round"] for r in rows] == ["0", "1", "2"]
    for r in rows[1:]:
        assert r["num_clients"] == "2" and r["dropped"] == "0"
        assert np.isfinite(float(r["eval_loss"])) and np.isfinite(float(r["train_loss"]))
    # round 1 carries the dense base weights; round 2 only the head and the adapters
    assert int(rows[2]["downlink_bytes"]) < int(rows[1]["downlink_bytes"]) / 4
    assert float(rows[2]["train_loss"]) < float(rows[0]["eval_loss"])  # it learned something
