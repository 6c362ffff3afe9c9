"""A reply of hundreds of arrays over a real SuperLink and stamen-supernode on loopback
arrives intact in a small number of Fleet RPCs that does not depend on the array count
(bench/transfer_app: packed records, stamen/pack.py). Speed is the benchmark's business
(bench/transfer_goodput.py); this checks only counts and content."""

import csv
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

APP = Path(__file__).resolve().parent.parent / "bench" / "transfer_app"
ARRAYS = 400


def test_hundreds_of_arrays_cross_in_a_bounded_number_of_rpcs(tmp_path, flower_programs):
    from deploy.local import LocalDeployment, NodeSpec

    spec = {
        "down": [[f"layer.{i}.weight", [3, 5], "float32"] for i in range(ARRAYS)] + [["kept.rows", [7], "int64"]],
        "up": [[f"layer.{i}.lora_{ab}", [2, 5] if ab == "A" else [3, 2], "float32"] for i in range(ARRAYS // 2) for ab in "AB"]
        + [["scalar", [], "float64"], ["empty", [0], "float32"], ["mask", [4], "bool"]],
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    result = tmp_path / "result.json"
    overrides = f'spec-path="{tmp_path / "spec.json"}" result-path="{result}" output.dir="{tmp_path}" num-rounds=2 packed=true'
    with LocalDeployment([NodeSpec(0, 1, num_threads=1)], workdir=tmp_path / "_deploy", app_dir=APP) as dep:
        dep.run([overrides], echo=lambda line: None, timeout=300)
    out = json.loads(result.read_text())
    assert [(r["round"], r["error"], r["down_intact"], r["up_intact"], r["up_arrays"]) for r in out["results"]] == [
        (1, "", True, True, ARRAYS + 3),
        (2, "", True, True, ARRAYS + 3),
    ]
    rows = list(csv.DictReader(open(Path(out["run_dir"]) / "clients.csv")))
    assert len(rows) == 2
    for r in rows:
        # Flower's own records: an Array and an ArrayChunk per array, one RPC each (> 800)
        assert 3 <= int(r["rpcs_up"]) <= 16, r["rpcs_up"]
        assert 3 <= int(r["rpcs_down"]) - int(r["pull_retries"]) <= 16, (r["rpcs_down"], r["pull_retries"])
