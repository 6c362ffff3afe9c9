"""TLS and SuperNode authentication on loopback, with the files deploy/tls/generate.sh
writes (the command the device guides and with-tls.yml use): a SuperLink with TLS and
--enable-supernode-auth, two registered stamen-supernodes, one run of the payload app;
then a SuperNode with a key nobody registered is refused."""

import csv
import subprocess
import time
from pathlib import Path

import pytest

from deploy.local import LocalDeployment, NodeSpec, free_port

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent
PAYLOAD_APP = Path(__file__).parent / "apps" / "payload"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    out = tmp_path_factory.mktemp("tls")
    subprocess.run(["sh", str(ROOT / "deploy" / "tls" / "generate.sh"), str(out), "3"], check=True, capture_output=True, timeout=120)
    return out


def test_generated_server_certificate_names_the_addresses_nodes_dial(certs):
    text = subprocess.run(["openssl", "x509", "-in", str(certs / "server.pem"), "-noout", "-text"],
                          capture_output=True, text=True, check=True).stdout
    assert "DNS:superlink" in text and "IP Address:127.0.0.1" in text
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(certs / "ca.crt"), str(certs / "server.pem")],
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert (certs / "supernode-2.key.pub").read_text().startswith("ecdsa-sha2-nistp384 ")


def test_auth_needs_tls(tmp_path):
    with pytest.raises(ValueError, match="TLS"):
        LocalDeployment([NodeSpec(0, 1)], workdir=tmp_path, supernode_auth=True)


def test_registered_nodes_train_over_tls_and_a_stranger_is_refused(certs, tmp_path):
    nodes = [NodeSpec(0, 2), NodeSpec(1, 2)]
    with LocalDeployment(nodes, workdir=tmp_path / "_deploy", app_dir=PAYLOAD_APP, tls_dir=certs, supernode_auth=True) as dep:
        run_id = dep.run([f'output.dir="{tmp_path}" min-nodes=2 down-bytes=10000 up-bytes=10000'], echo=lambda line: None, timeout=300)
        # node 2's key was generated but never registered
        stranger = dep._spawn("stranger", ["flower-supernode", "--root-certificates", str(certs / "ca.crt"),
                                           "--auth-supernode-private-key", str(certs / "supernode-2.key"),
                                           "--superlink", f"127.0.0.1:{dep.fleet_port}", "--port", str(free_port()),
                                           "--max-retries", "1", "--node-config", "partition-id=0 num-partitions=2"],
                              tmp_path / "_deploy" / "stranger")
        try:
            stranger.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pass
        time.sleep(1)
        stranger_log = (tmp_path / "_deploy" / "stranger.log").read_text()
    rows = list(csv.DictReader(open(tmp_path / str(run_id) / "clients.csv")))
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    assert all(r["transport"] == "stamen-supernode" and r["downlink_s"] != "" for r in rows)  # timing works under TLS
    assert stranger.returncode not in (None, 0), f"an unregistered SuperNode was not refused:\n{stranger_log[-2000:]}"
