"""The device guides (deploy/devices/*.md), tried as far as this machine allows: every
`stamen-supernode`, `flower-superlink`, `flwr` and `stamen` command in them uses only
flags the installed program accepts, `stamen device` runs as written, and the systemd
unit passes `systemd-analyze verify`. (TLS and authentication as the guides set them
up run end to end in tests/test_tls_auth.py.)"""

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GUIDES = sorted((ROOT / "deploy" / "devices").glob("*.md"))
PROGRAMS = ("stamen-supernode", "flower-superlink", "flwr", "stamen")


def _commands():
    """(guide, argv) for each command line of a program above in a ```bash block."""
    found = []
    for guide in GUIDES:
        for block in re.findall(r"```bash\n(.*?)```", guide.read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0].strip()
                if not line or line.startswith("#"):
                    continue
                for part in re.split(r"&&|\|\|", line):
                    argv = shlex.split(part.strip())
                    while argv and re.match(r"^[A-Z_]+=", argv[0]):  # VAR=value prefixes
                        argv.pop(0)
                    if argv and Path(argv[0]).name in PROGRAMS:
                        argv[0] = Path(argv[0]).name
                        found.append((guide.name, argv))
    return found


COMMANDS = _commands()


def test_the_guides_hold_commands():
    names = {argv[0] for _, argv in COMMANDS}
    assert {"stamen-supernode", "flower-superlink", "flwr", "stamen"} <= names
    assert {g.name for g in GUIDES} >= {"README.md", "raspberry-pi.md", "jetson.md", "gpu-server.md"}


def _help(argv):
    """The --help text of the (sub)command, e.g. `flwr supernode register --help`."""
    words = [argv[0]]
    for w in argv[1:]:
        if w.startswith("-") or len(words) >= (3 if argv[0] == "flwr" else 2 if argv[0] == "stamen" else 1):
            break
        words.append(w)
    out = subprocess.run([*words, "--help"], capture_output=True, text=True, timeout=120)
    return words, out.stdout + out.stderr


@pytest.mark.parametrize("guide,argv", COMMANDS, ids=[f"{g}:{' '.join(a[:3])}" for g, a in COMMANDS])
def test_every_flag_exists(guide, argv):
    if shutil.which(argv[0]) is None:
        pytest.fail(f"{argv[0]} is not on PATH: run the tests through `make test`")
    words, text = _help(argv)
    flags = [a.split("=")[0] for a in argv[len(words):] if a.startswith("--")]
    missing = [f for f in flags if f not in text]
    assert not missing, f"{guide}: `{' '.join(words)}` does not accept {missing}"


def test_stamen_device_runs_as_written():
    runs = [argv for _, argv in COMMANDS if argv[:2] == ["stamen", "device"]]
    assert runs
    for argv in runs:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        assert '"detected-class"' in out.stdout and '"lora-rank"' in out.stdout


def test_systemd_unit_verifies(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    unit = (ROOT / "deploy" / "devices" / "stamen-supernode.service").read_text()
    real = shutil.which("stamen-supernode")
    assert real, "stamen-supernode is not on PATH"
    # the unit's paths are the device's (/opt/stamen, /etc/stamen): point them at this checkout
    unit = unit.replace("/opt/stamen/.venv/bin/stamen-supernode", real).replace("/etc/stamen/supernode.env", str(tmp_path / "env"))
    unit = unit.replace("User=stamen\n", "User=root\n").replace("Group=stamen\n", "Group=root\n")
    shutil.copy(ROOT / "deploy" / "devices" / "stamen-supernode.env", tmp_path / "env")
    (tmp_path / "stamen-supernode.service").write_text(unit)
    out = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "stamen-supernode.service")],
                         capture_output=True, text=True, timeout=120)
    problems = [line for line in (out.stdout + out.stderr).splitlines() if "stamen-supernode.service" in line]
    assert out.returncode == 0 and not problems, out.stdout + out.stderr
