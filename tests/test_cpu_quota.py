"""train_s follows the CPU a node gets: two stamen-supernodes do the same fixed amount of
single-threaded work, one of them inside a cgroup limited to a quarter of a core. Its
measured training loop must take about 4x as long. The quarter core is shared with
everything else in that cgroup (the SuperNode's gRPC polling, the ClientApp process's
resource sampler and Flower threads), so the loop gets a little less than a quarter and
the ratio sits above 4 (4.7x and 5.4x seen on 2-core machines). Accepted: 3x to 8x; below
3x the quota is not applied, above 8x the group got less than half the quarter core.

Needs root and a cgroup cpu controller; skipped with the reason otherwise.
"""

import csv
import os
from pathlib import Path

import pytest

from deploy import cgroups
from deploy.local import LocalDeployment, NodeSpec

pytestmark = pytest.mark.integration
PAYLOAD_APP = Path(__file__).parent / "apps" / "payload"


def test_train_time_grows_with_a_cpu_quota(tmp_path):
    if (reason := cgroups.available()) is not None:
        pytest.skip(f"CPU quota test: {reason}")
    with cgroups.Limits(f"stamen-test-{os.getpid()}", cpus=0.25) as quota:
        nodes = [NodeSpec(0, 2, device_class="raspberry-pi", cgroups=tuple(map(str, quota.paths))), NodeSpec(1, 2, device_class="cpu")]
        with LocalDeployment(nodes, workdir=tmp_path / "_deploy", app_dir=PAYLOAD_APP) as dep:
            run_id = dep.run(
                [f'output.dir="{tmp_path}" min-nodes=2 down-bytes=1000 up-bytes=1000 work-iterations=6000000'],
                echo=lambda line: None,
                timeout=300,
            )
    assert not quota.path.exists(), "the cgroup was left behind"
    rows = list(csv.DictReader(open(tmp_path / str(run_id) / "clients.csv")))
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    by_class = {r["device_class"]: r for r in rows}  # node-config labels, carried by the ClientApp mod
    slow, fast = by_class["raspberry-pi"], by_class["cpu"]
    ratio = float(slow["loop_s"]) / float(fast["loop_s"])
    print(f"loop_s: {float(slow['loop_s']):.3f} s at 0.25 CPU vs {float(fast['loop_s']):.3f} s: {ratio:.2f}x")
    assert 3.0 < ratio < 8.0
    assert float(slow["train_s"]) > float(fast["train_s"])
