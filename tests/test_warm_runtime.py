"""The warm runtime on real processes (loopback): a worker killed in the middle of its
training costs that one reply; its node answers the message with an error at once and
serves the next round, warm again."""

import csv
import json
import signal
import threading
import time

import psutil
import pytest

from deploy.local import LocalDeployment, NodeSpec

pytestmark = pytest.mark.integration


def _workers(supernode: psutil.Process) -> list[psutil.Process]:
    """The processes the node's warm executor forked (one per message)."""
    out = []
    for child in supernode.children():
        try:
            if "device_runtime.executor" in " ".join(child.cmdline()):
                out += child.children()
        except psutil.Error:
            continue
    return out


def _cpu_s(p: psutil.Process) -> float:
    try:
        t = p.cpu_times()
        return t.user + t.system
    except psutil.Error:
        return 0.0


@pytest.fixture(scope="module")
def crashed_run(tmp_path_factory, flower_programs, small_run):
    out = tmp_path_factory.mktemp("runs")
    # one torch thread each: two nodes of two OpenMP threads on two cores slow every step ~20x
    nodes = [NodeSpec(0, 2, device_class="raspberry-pi", lora_rank=4, num_threads=1), NodeSpec(1, 2, device_class="jetson", lora_rank=8, num_threads=1)]
    with LocalDeployment(nodes, workdir=out / "_deploy") as dep:
        node0 = psutil.Process(dep.procs[1][1].pid)
        overrides = [small_run, f'train.local-steps=40 output.dir="{out}"']
        result: dict = {}
        server_log: list[str] = []

        def run():
            try:
                result["run_id"] = dep.run(overrides, echo=server_log.append, timeout=600)
            except Exception as err:  # noqa: BLE001 - reported by the test
                result["error"] = err

        thread = threading.Thread(target=run)
        thread.start()
        killed = None
        deadline = time.monotonic() + 300
        while killed is None and thread.is_alive() and time.monotonic() < deadline:
            # a train worker burns CPU; the query worker before it is done in a fraction of a second
            busy = [w for w in _workers(node0) if _cpu_s(w) > 1.0]
            if busy:
                killed = busy[0].pid
                busy[0].send_signal(signal.SIGKILL)
            time.sleep(0.05)
        thread.join(timeout=600)
        log = (out / "_deploy" / "supernode-0.log").read_text()
    assert "error" not in result, result.get("error")
    assert killed is not None, "no training worker of node 0 was seen"
    (run_dir,) = [p for p in out.iterdir() if p.name != "_deploy"]
    return run_dir, killed, log, "\n".join(server_log)


def test_the_killed_worker_costs_its_reply_only(crashed_run):
    run_dir, killed, log, server_log = crashed_run
    profiles = json.loads((run_dir / "profiles.json").read_text())
    node0 = next(int(n) for n, p in profiles.items() if p["device-class"] == "raspberry-pi")
    rows = {(int(r["node_id"]), r["round"]): r for r in csv.DictReader(open(run_dir / "clients.csv"))}
    assert rows[(node0, "1")]["status"] == "error"
    assert rows[(node0, "2")]["status"] == "ok" and rows[(node0, "2")]["start"] == "warm"
    other = [n for (n, rnd) in rows if n != node0 and rnd == "1"]
    assert [rows[(n, "1")]["status"] for n in other] == ["ok"]
    metrics = {r["round"]: r for r in csv.DictReader(open(run_dir / "metrics.csv"))}
    assert metrics["1"]["num_clients"] == "1" and metrics["2"]["num_clients"] == "2"
    assert f"ClientApp worker {killed} was killed by signal 9 before it replied" in log
    # the server got the executor's answer (Flower's own, "ClientApp stopped responding.",
    # would come only when the task's heartbeat expired)
    expected = f"dropping node {node0} from round 1: client error: ClientApp worker {killed} was killed by signal 9"
    assert expected in server_log, [line for line in server_log.splitlines() if "dropping" in line]
