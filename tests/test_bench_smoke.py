"""The aggregation benchmark runs (one small case), so it cannot rot unnoticed; its
figures come from `python bench/lora_aggregation.py`, not from here."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))


def test_aggregation_bench_small_case():
    import lora_aggregation

    rows = lora_aggregation.run("minilm", 4, reps=1, echo=lambda line: None)
    assert {r["method"] for r in rows} == {"fedavg (flwr)", "flora", "flora (stack only)", "fedit", "hetlora", "flexlora"}
    assert all(r["median_s"] > 0 and r["peak_mb"] > 0 for r in rows)


def test_early_exit_depth_bench_small_case():
    import early_exit_depth

    rows = early_exit_depth.run("vit", reps=1, echo=lambda line: None)
    assert [r["max_exit"] for r in rows] == [1, 2, 3, 4] and [r["blocks"] for r in rows] == [2, 4, 6, 8]
    held = [r["held_mb"] for r in rows]
    assert held == sorted(held) and held[0] < held[-1]  # a shallower node holds less


@pytest.mark.parametrize("model", ["minilm", "reefl"])
def test_dp_overhead_bench_small_case(model):
    import dp_overhead

    rows = dp_overhead.run(model, reps=1, echo=lambda line: None, memory=False)
    assert [r["mode"] for r in rows] == ["plain", "dp-sgd"] and all(r["median_s"] > 0 for r in rows)
