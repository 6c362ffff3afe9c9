"""The aggregation benchmark runs (one small case), so it cannot rot unnoticed; its
figures come from `python bench/lora_aggregation.py`, not from here."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))


def test_aggregation_bench_small_case():
    import lora_aggregation

    rows = lora_aggregation.run("minilm", 4, reps=1, echo=lambda line: None)
    assert {r["method"] for r in rows} == {"fedavg (flwr)", "flora", "flora (stack only)", "fedit", "hetlora", "flexlora"}
    assert all(r["median_s"] > 0 and r["peak_mb"] > 0 for r in rows)
