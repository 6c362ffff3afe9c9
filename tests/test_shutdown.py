"""`stamen local` stops every process it started when interrupted (Ctrl-C / SIGINT)."""

import signal
import subprocess
import sys
import time

import psutil
import pytest

pytestmark = pytest.mark.integration


def test_sigint_stops_every_process(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "local", "--nodes", "2", "--output", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    me = psutil.Process(proc.pid)
    deadline = time.monotonic() + 120
    seen: dict[int, psutil.Process] = {}
    # wait until the SuperLink, both SuperNodes and the ServerApp run
    while time.monotonic() < deadline:
        for child in me.children(recursive=True):
            seen.setdefault(child.pid, child)
        names = " ".join(_cmdline(p) for p in seen.values())
        if names.count("stamen-supernode") >= 2 and "flwr-serverapp" in names:
            break
        time.sleep(1)
    else:
        proc.kill()
        pytest.fail(f"deployment did not come up; output:\n{proc.communicate()[0]}")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert "interrupted: all processes stopped" in out
    gone, alive = psutil.wait_procs(list(seen.values()), timeout=10)
    assert not alive, f"still running: {[_cmdline(p) for p in alive]}"


def _cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline()) if p.is_running() else ""
    except psutil.Error:  # exited (or a zombie) since it was seen
        return ""
