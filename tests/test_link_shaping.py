"""Transfer times are right: a SuperLink and a stamen-supernode in two network namespaces
joined by a veth pair shaped with tbf (8 Mbit/s down, 4 Mbit/s up). The measured
downlink and uplink of payloads of 1 MB and more must be within 10% of the time the
shaper needs for them: bytes*8/rate, where tbf counts each full TCP segment's 1448 bytes
of payload with its Ethernet, IPv4 and TCP headers (14 + 20 + 32 bytes, timestamps on):
4.6% more than the payload. Without that, the 1 MB downlink sat at +5-10% of the bare
bytes*8/rate and once measured +10.04%.

Needs root and iproute2; skipped with the reason otherwise. Traffic stays inside the two
namespaces this test creates (they have no route anywhere else) and both are deleted
afterwards, also on failure.
"""

import csv
import os
from pathlib import Path

import pytest

from deploy import netns
from deploy.local import LocalDeployment, NodeSpec

pytestmark = pytest.mark.integration
PAYLOAD_APP = Path(__file__).parent / "apps" / "payload"
DOWN_MBIT, UP_MBIT = 8, 4
ON_THE_WIRE = (1448 + 14 + 20 + 32) / 1448  # bytes tbf counts per payload byte of a full segment


@pytest.fixture(scope="module")
def shaped_rows(tmp_path_factory, flower_programs):
    if (reason := netns.available()) is not None:
        pytest.skip(f"link shaping test needs network namespaces: {reason}")
    out = tmp_path_factory.mktemp("shaped")
    prefix = f"stm{os.getpid() % 100000}"
    netns.cleanup(prefix)
    rows = []
    with netns.NamespacePair(prefix, down_mbit=DOWN_MBIT, up_mbit=UP_MBIT) as link:
        for ns in (link.server_ns, link.node_ns):  # cubic, whatever the host sets: see deploy/netns.py
            assert "congctl cubic" in netns.ip("-n", ns, "route").stdout
        node = NodeSpec(0, 1, netns=link.node_ns, extra={"network": "tbf"})
        with LocalDeployment(
            [node], workdir=out / "_deploy", app_dir=PAYLOAD_APP, fleet_host=link.server_ip, superlink_netns=link.server_ns
        ) as dep:
            for down, up in ((1_000_000, 1_000_000), (4_000_000, 3_000_000)):
                run_id = dep.run([f'output.dir="{out}" down-bytes={down} up-bytes={up}'], echo=lambda line: None, timeout=300)
                path = out / str(run_id) / "clients.csv"
                assert path.is_file(), f"the run wrote no clients.csv; see {out}/_deploy"
                rows += list(csv.DictReader(open(path)))
    assert not any(n.startswith(prefix) for n in os.popen("ip netns list").read().split()), "namespaces left behind"
    return rows


def test_downlink_matches_the_shaped_rate(shaped_rows):
    assert len(shaped_rows) == 2
    for r in shaped_rows:
        # downlink and uplink events may take different paths: "reply+telemetry"
        assert set(r["transfer_via"].split("+")) <= {"telemetry", "reply"} and r["status"] == "ok"
        expected = int(r["bytes_down"]) * ON_THE_WIRE * 8 / (DOWN_MBIT * 1e6)
        measured = float(r["downlink_s"])
        print(f"downlink {int(r['bytes_down'])} B: {measured:.3f} s measured, {expected:.3f} s expected")
        assert abs(measured / expected - 1) < 0.10, f"downlink {measured:.3f} s vs {expected:.3f} s expected"


def test_uplink_matches_the_shaped_rate(shaped_rows):
    for r in shaped_rows:
        expected = int(r["bytes_up"]) * ON_THE_WIRE * 8 / (UP_MBIT * 1e6)
        measured = float(r["uplink_s"])
        print(f"uplink {int(r['bytes_up'])} B: {measured:.3f} s measured, {expected:.3f} s expected")
        assert abs(measured / expected - 1) < 0.10, f"uplink {measured:.3f} s vs {expected:.3f} s expected"
