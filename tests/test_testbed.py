"""The emulated testbed (deploy/testbed.py) on this host: namespaces behind a bridge, tbf
per direction, the delay proxy, CPU and memory cgroups, and teardown.

One run of the payload app with two nodes: "near" (100 Mbit/s both ways, no delay) and
"far" (8 Mbit/s down, 4 Mbit/s up, 40 ms each way). Needs root, iproute2 and cgroups;
skipped with the reason otherwise. Every namespace and cgroup is created by the test
under its own prefix and is checked to be gone afterwards.
"""

import csv
import os
from pathlib import Path

import pytest

from deploy import netns, testbed
from deploy.testbed import Network, Topology, load_profiles

pytestmark = pytest.mark.integration
PAYLOAD_APP = Path(__file__).parent / "apps" / "payload"
NEAR = Network("near", down_mbit=100, up_mbit=100)
FAR = Network("far", down_mbit=8, up_mbit=4, delay_ms=40)


def _namespaces(prefix):
    return netns.namespaces(prefix)


def test_every_shipped_profile_parses():
    networks, devices = load_profiles()
    assert {"ethernet", "wifi", "5g"} <= set(networks)
    assert {"raspberry-pi-4", "raspberry-pi-5", "jetson-orin-nano", "gpu-server"} <= set(devices)
    assert networks["5g"].up_mbit < networks["wifi"].up_mbit < networks["ethernet"].up_mbit


def test_a_bad_profile_names_the_entry_and_key(tmp_path):
    bad = tmp_path / "p.toml"
    bad.write_text('[network.x]\ndown-mbit = 10\nup-mbit = -1\n[device.d]\ncpus = 1\nmemory-gib = 1\nlora-rank = 4\nclass = "cpu"\n')
    with pytest.raises(ValueError, match=r"\[network.x\] `up-mbit`"):
        load_profiles(bad)


@pytest.fixture(scope="module")
def testbed_run(tmp_path_factory):
    if (reason := testbed.available()) is not None:
        pytest.skip(f"testbed needs {reason}")
    out = tmp_path_factory.mktemp("testbed")
    prefix = f"stmtbt{os.getpid() % 10000}"
    _, devices = load_profiles()
    pi = devices["raspberry-pi-5"]  # 1 CPU, 8 GiB
    nodes = [testbed.TestbedNode(pi, NEAR), testbed.TestbedNode(pi, FAR)]
    seen = {}
    with testbed.Testbed(nodes, workdir=out / "_deploy", run_prefix=prefix, app_dir=PAYLOAD_APP) as bed:
        seen["namespaces"] = _namespaces(prefix)
        seen["memory_limit"] = [
            Path(p, "memory.limit_in_bytes").read_text().strip() for lim in bed.limits for p in lim.paths if "memory" in str(p)
        ]
        run_id = bed.run([f'output.dir="{out}" min-nodes=2 down-bytes=1000000 up-bytes=1000000'], echo=lambda line: None, timeout=300)
        seen["supernode_pid_in_cgroup"] = all(
            Path(lim.path, "cgroup.procs").read_text().split() for lim in bed.limits
        )
    seen["namespaces_after"] = _namespaces(prefix)
    seen["cgroups_after"] = [str(p) for lim in bed.limits for p in lim.paths if p.exists()]
    rows = {r["network"]: r for r in csv.DictReader(open(out / str(run_id) / "clients.csv"))}
    return seen, rows


def test_topology_is_namespaced_and_torn_down(testbed_run):
    seen, _ = testbed_run
    assert len(seen["namespaces"]) == 4  # switch, SuperLink, two nodes
    assert seen["namespaces_after"] == [] and seen["cgroups_after"] == []
    assert seen["supernode_pid_in_cgroup"]


def test_memory_limit_of_the_device_class_is_set(testbed_run):
    seen, _ = testbed_run
    if seen["memory_limit"]:  # cgroup v1 (v2 keeps it in the one group, checked by the same class)
        assert seen["memory_limit"] == [str(8 << 30)] * 2


def test_delay_shows_in_the_clock_probe_round_trip(testbed_run):
    _, rows = testbed_run
    far, near = float(rows["far"]["clock_rtt_s"]), float(rows["near"]["clock_rtt_s"])
    print(f"clock probe RTT: far {far * 1e3:.1f} ms, near {near * 1e3:.1f} ms")
    assert 0.080 <= far < 0.110  # 2 x 40 ms plus processing
    assert near < 0.020


def test_transfers_follow_each_nodes_link(testbed_run):
    _, rows = testbed_run
    far, near = rows["far"], rows["near"]
    for r in (far, near):
        assert r["status"] == "ok" and set(r["transfer_via"].split("+")) <= {"telemetry", "reply"}
        assert int(r["bytes_up"]) >= int(r["payload_up_bytes"]) > 1_000_000  # each node pushed its own bytes
    down_floor = int(far["bytes_down"]) * 8 / 8e6 + 0.080  # the bytes at 8 Mbit/s, plus at least one round trip
    up_floor = int(far["bytes_up"]) * 8 / 4e6 + 0.080
    print(f"far: downlink {float(far['downlink_s']):.3f} s (floor {down_floor:.3f}), uplink {float(far['uplink_s']):.3f} s "
          f"(floor {up_floor:.3f}); near: downlink {float(near['downlink_s']):.3f} s, uplink {float(near['uplink_s']):.3f} s")
    assert down_floor <= float(far["downlink_s"]) < 3 * down_floor
    assert up_floor <= float(far["uplink_s"]) < 3 * up_floor
    assert float(near["uplink_s"]) < float(far["uplink_s"]) / 4


def test_down_removes_a_crashed_runs_leftovers():
    if (reason := testbed.available()) is not None:
        pytest.skip(f"testbed needs {reason}")
    prefix = f"stmtbc{os.getpid() % 10000}"
    topo = Topology(prefix, [FAR], subnet="10.213.9")
    topo.__enter__()  # a run that crashed before its teardown
    try:
        assert len(_namespaces(prefix)) == 3
        for ns in (topo.server_ns, *topo.node_ns):  # the emulated links do not take the host's TCP congestion control
            assert "congctl cubic" in netns.ip("-n", ns, "route", "show", "dev", "eth0").stdout
    finally:
        gone = testbed.teardown(prefix)  # also when a check above failed: no namespaces left behind
    assert sorted(gone["namespaces"]) == sorted([f"{prefix}-sw", f"{prefix}-sl", f"{prefix}-n0"])
    assert _namespaces(prefix) == []


def test_topology_refuses_a_prefix_that_teardown_would_not_find():
    with pytest.raises(ValueError, match="stmtb"):
        Topology("other", [NEAR])


def test_an_unknown_congestion_control_is_refused_before_any_route_changes():
    with pytest.raises(netns.NamespaceError, match="not available here"):
        netns.pin_congestion_control("no-such-ns", "eth0", "10.213.9.0/24", "10.213.9.1", "no-such-algorithm")


def test_testbed_ranks_replace_the_device_profiles_ranks():
    import argparse

    from cli.main import _testbed_nodes

    args = argparse.Namespace(profiles=str(testbed.PROFILES), devices="raspberry-pi-4,raspberry-pi-5", network="5g", nodes=3, ranks="")
    assert [n.device.lora_rank for n in _testbed_nodes(args, None)] == [4, 8, 4]  # the profiles'
    args.ranks = "64,96"
    nodes = _testbed_nodes(args, None)
    assert [n.device.lora_rank for n in nodes] == [64, 96, 64]
    assert [n.device.cpus for n in nodes] == [0.5, 1.0, 0.5]  # nothing else changes
    args.ranks = "0"
    with pytest.raises(ValueError, match="--ranks"):
        _testbed_nodes(args, None)
