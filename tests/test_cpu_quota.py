"""train_s follows the CPU a node gets: two stamen-supernodes do the same fixed amount of
single-threaded work, one of them inside a cgroup limited to a quarter of a core.

What the quota guarantees is the CPU share, not a wall-time ratio: the unlimited node
competes on a 2-core machine with the SuperLink, the SuperExec, the ServerApp and the
other node, so its loop may get well under a full core (CI once measured 0.73 s where an
idle machine gives 0.64 s, which took a bare "4x slower" ratio down to 2.99x). So the test
reads the CPU seconds each ClientApp process spent in its loop (``loop_cpu_s``, the
kernel's accounting) and checks the share of a core each loop got, ``loop_cpu_s / loop_s``:

- the limited node got at most a quarter core (0.30 allowing for the 100 ms CFS period),
  and at least 0.15 (the quota is a ceiling the scheduler lets it reach); the other more
  than half a core: the quota is applied, to the right node only;
- the loop took at least 2x as long;
- both loops burned comparable CPU time (0.5-2x): the same work, accounted the same way.
  Not tighter: a CPU second is not a fixed amount of work on a VM (hyperthread siblings,
  caches cooled between 25 ms slices), and CI's 1.54x (from the sampled means the test
  used then) was not explained.

On an idle 2-core machine: see docs/measurements.md.

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
    loop = {name: float(row["loop_s"]) for name, row in (("slow", slow), ("fast", fast))}
    cpu = {name: float(row["loop_cpu_s"]) for name, row in (("slow", slow), ("fast", fast))}
    share = {name: cpu[name] / loop[name] for name in loop}
    ratio = loop["slow"] / loop["fast"]
    print(
        f"loop {loop['slow']:.3f} s, {cpu['slow']:.3f} CPU s ({share['slow']:.0%} of a core, quota 25%) vs "
        f"{loop['fast']:.3f} s, {cpu['fast']:.3f} CPU s ({share['fast']:.0%}): {ratio:.2f}x slower, "
        f"CPU time ratio {cpu['slow'] / cpu['fast']:.2f}; handler means {slow['cpu_mean_pct']} vs {fast['cpu_mean_pct']} %"
    )
    assert 0.15 <= share["slow"] <= 0.30, "the quota was not applied to the limited node, or starved it"
    assert share["fast"] > 0.50, "the unlimited node did not get more than half a core"
    assert ratio > 2.0
    assert 0.5 < cpu["slow"] / cpu["fast"] < 2.0, "the two loops did not do comparable CPU work"
    assert float(slow["train_s"]) > float(fast["train_s"])
