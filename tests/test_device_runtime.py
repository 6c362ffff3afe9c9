"""The warm executor's small parts, without a SuperNode: its flags, the worker->executor
frames, the start label and the process age the measurement mod records."""

import os
import time

import pytest

from device_runtime import executor, worker
from measurements import client_mod
from measurements.resources import process_age_s
from ml import cache


def test_frames_round_trip_in_order():
    read_end, write_end = os.pipe()
    executor._write_frame(write_end, b"\x00metadata\xff")
    executor._write_frame(write_end, worker.PUSHED)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        assert executor._read_frames(pipe.read()) == [b"\x00metadata\xff", worker.PUSHED]


def test_a_truncated_frame_is_dropped():
    """A worker killed while writing leaves half a frame: the executor reads what is whole."""
    assert executor._read_frames(b"\x00\x00\x00\x03abc\x00\x00\x00\x09abc") == [b"abc"]


def test_executor_flags_match_superexec_and_are_checked():
    args = executor.parse_args(["--insecure", "--runtime-api-address", "127.0.0.1:9094", "--parent-pid", "12"])
    assert args.insecure and args.runtime_api_address == "127.0.0.1:9094" and args.parent_pid == 12 and args.poll == 0.05
    with pytest.raises(SystemExit):
        executor.parse_args(["--insecure", "--runtime-api-address", "x:1", "--poll", "0"])
    with pytest.raises(SystemExit):  # per-run virtual environments are not served warm
        executor.parse_args(["--insecure", "--runtime-api-address", "x:1", "--allow-runtime-dependency-installation"])


def test_the_cache_switch_is_one_name_on_both_sides():
    """The executor must not import ml (the app's copy comes from the FAB), so it spells
    the names itself: they must stay those the app reads."""
    assert executor.CACHE_ENV == cache.ENV_VAR
    assert executor.START_ENV == client_mod.START_ENV
    assert worker.MESSAGE_WAIT_ENV == client_mod.MESSAGE_WAIT_ENV


def test_start_label(monkeypatch):
    monkeypatch.delenv(client_mod.START_ENV, raising=False)
    assert client_mod.start_kind("flower-supernode") == "cold"
    assert client_mod.start_kind("simulation") == "simulation"
    monkeypatch.setenv(client_mod.START_ENV, "warm")
    assert client_mod.start_kind("stamen-supernode") == "warm"


def test_process_age_counts_from_the_process_start():
    """A child that sleeps 0.3 s reports an age of at least 0.3 s and at most the time the
    parent saw pass since before the fork (plus the kernel's 10 ms tick)."""
    read_end, write_end = os.pipe()
    before = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            time.sleep(0.3)
            os.write(write_end, f"{process_age_s():.6f}".encode())
        finally:
            os._exit(0)
    os.close(write_end)
    age = float(os.read(read_end, 64))
    elapsed = time.monotonic() - before
    os.waitpid(pid, 0)
    assert 0.29 <= age <= elapsed + 0.02


def test_an_app_that_could_not_be_loaded_raises_flowers_load_error():
    """serve() turns LoadClientAppError into flwr's LOAD_CLIENT_APP_EXCEPTION reply."""
    from flwr.clientapp.client_app import LoadClientAppError

    with pytest.raises(LoadClientAppError, match="could not be loaded: <class 'ImportError'>"):
        worker.unloadable("<class 'ImportError'>:<'no module named ml'>")(None, None)


def test_the_executor_leaves_with_its_supernode():
    """An executor whose SuperNode is killed exits, even when it is stuck retrying the
    SuperNode's gone Runtime API and SIGINT is ignored, as it is in a job a shell started
    in the background (flwr's own monitor only raises SIGINT: executors outlived their
    SuperNodes that way, holding their memory)."""
    import signal
    import subprocess
    import sys

    import psutil

    stand_in = (  # a "SuperNode" that starts the executor against a closed port and waits
        "import os, subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-m', 'device_runtime.executor', '--insecure', '--runtime-api-address',"
        " '127.0.0.1:9', '--parent-pid', str(os.getpid())], stderr=subprocess.PIPE, text=True)\n"
        "print(p.pid, flush=True)\n"
        "for line in p.stderr:\n"
        "    if 'warm executor ready' in line:\n"
        "        print('ready', flush=True)\n"
        "        break\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", stand_in], stdout=subprocess.PIPE, text=True, cwd=executor.__file__.rsplit("/device_runtime/", 1)[0],
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # inherited by the executor
    )
    pid = None
    try:
        pid = int(parent.stdout.readline())
        assert parent.stdout.readline().strip() == "ready"  # imports done: now in its AcquireTask retries
        time.sleep(1.0)
        parent.kill()
        parent.wait(timeout=30)
        proc = psutil.Process(pid)
        proc.wait(timeout=30)  # raises TimeoutExpired if the executor outlives its SuperNode
    finally:
        parent.kill()
        if pid is not None and psutil.pid_exists(pid):
            psutil.Process(pid).kill()
