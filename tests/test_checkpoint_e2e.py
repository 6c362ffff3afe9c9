"""A run survives a crash, on real processes on 127.0.0.1 (docs/checkpoints.md).

Two loopback SuperNodes (`pair`) serve the uninterrupted runs. A crash is a SIGKILL of
the ServerApp once a round's checkpoint is on disk, on a deployment of its own, which is
then torn down; `stamen resume` continues the run on a new SuperLink without --database
(the nodes come back under new ids and are matched by partition id), through the
run-config key `flwr run` takes.

FLoRA, 4 rounds, killed after round 2, resumed with `stamen resume`, ends at the model of
the uninterrupted run under the same seeds. The exported models are loaded as a Hugging
Face user would, in a fresh process with transformers and peft only, and reproduce
metrics.csv's accuracy exactly. FedSpine's bandits and local DP's ledgers continue.
"""

import csv
import json
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import numpy as np
import psutil
import pytest

from cli.main import main, node_state_dir
from deploy.local import LocalDeployment, NodeSpec
from ml.tasks import build_task
from server_app.evaluation import evaluated_split
from stamen.config import StamenConfig

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
CONFIG = (
    "strategy.num-rounds=4 train.local-steps=2 train.batch-size=4 model.max-seq-len=32 "
    "eval.max-examples=32 data.test-fraction=0.1"
)
SHORT = CONFIG.replace("num-rounds=4", "num-rounds=3")


@pytest.fixture(scope="module")
def pair(tmp_path_factory, flower_programs):
    """A SuperLink and 2 stamen-supernodes, as `stamen local --nodes 2 --ranks 4,8
    --device-classes raspberry-pi,jetson` starts them, shared by the runs of this file."""
    home = tmp_path_factory.mktemp("pair")
    nodes = [NodeSpec(i, 2, device_class=c, lora_rank=r, num_threads=1, extra={"state-dir": str(node_state_dir(home, i))})
             for i, (c, r) in enumerate((("raspberry-pi", 4), ("jetson", 8)))]
    with LocalDeployment(nodes, workdir=home / "_deploy") as dep:
        yield dep


def _run_dir(out: Path) -> Path:
    (run_dir,) = [p for p in out.iterdir() if not p.name.startswith("_")]  # _deploy, _state
    return run_dir


def _run(dep, out: Path, run_config: list[str]) -> None:
    dep.run([*run_config, f'output.dir="{out}" strategy.min-nodes=2'], echo=lambda line: None, timeout=600)


def _whole(dep, out: Path, run_config: str) -> Path:
    _run(dep, out, [run_config])
    return _run_dir(out)


def _killed_after(out: Path, run_config: str, after_round: int) -> Path:
    """A run on 2 nodes of its own, as `pair`'s, whose ServerApp is SIGKILLed once round
    ``after_round``'s checkpoint is on disk; the deployment is then torn down like a
    crashed machine's (the nodes' state dirs stay, as a device's disk would).

    Not on `pair`: a warm node that already holds an instruction of the killed run waits
    for that message's objects, which the SuperNode no longer fetches once the run is not
    running, for up to Flower's pull limit (docs/checkpoints.md)."""
    nodes = [NodeSpec(i, 2, device_class=c, lora_rank=r, num_threads=1, extra={"state-dir": str(node_state_dir(out, i))})
             for i, (c, r) in enumerate((("raspberry-pi", 4), ("jetson", 8)))]
    killed = []
    with LocalDeployment(nodes, workdir=out / "_deploy" / "killed") as dep:
        superlink = next(p for name, p, _ in dep.procs if name == "superlink")

        def kill_when_saved():
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and not killed:
                if list(out.glob(f"*/checkpoints/round-{after_round:05d}")):
                    for child in psutil.Process(superlink.pid).children(recursive=True):
                        if any("flwr-serverapp" in part for part in child.cmdline()):
                            child.kill()
                            killed.append(child.pid)
                    if killed:  # the machine goes down with it: no waiting for Flower to notice
                        for name, proc, _ in list(dep.procs):
                            if name == "flwr-run":
                                proc.kill()
                time.sleep(0.05)

        watcher = threading.Thread(target=kill_when_saved, daemon=True)
        watcher.start()
        try:
            _run(dep, out, [run_config])
        except RuntimeError:
            pass  # flwr run reports the failed run
        watcher.join(timeout=5)
    assert killed, "the ServerApp was not found to kill"
    return _run_dir(out)


def _crash_and_resume(out: Path, run_config: str, after_round: int) -> tuple[Path, list[str]]:
    """Killed, then continued by `stamen resume` on new processes: a new SuperLink without
    --database, so the nodes register under new ids and are matched by partition id."""
    run_dir = _killed_after(out, run_config, after_round)
    crashed_rounds = [r["round"] for r in _rows(run_dir / "metrics.csv")]
    assert main(["resume", str(run_dir), "--timeout", "600"]) == 0, f"stamen resume failed; logs under {out}/_deploy"
    return run_dir, crashed_rounds


def _rows(path: Path) -> list[dict]:
    return list(csv.DictReader(open(path)))


@pytest.fixture(scope="module")
def uninterrupted(pair, tmp_path_factory):
    return _whole(pair, tmp_path_factory.mktemp("whole"), CONFIG)


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, flower_programs):
    """Killed after round 2 of 4, then `stamen resume`."""
    return _crash_and_resume(tmp_path_factory.mktemp("crashed"), CONFIG, after_round=2)


def test_the_crash_left_rounds_behind(resumed):
    run_dir, crashed_rounds = resumed
    assert crashed_rounds[:3] == ["0", "1", "2"] and "4" not in crashed_rounds  # killed mid-run


def test_resumed_run_ends_at_the_uninterrupted_model(uninterrupted, resumed):
    run_dir, _ = resumed
    whole, cont = np.load(uninterrupted / "global_model.npz"), np.load(run_dir / "global_model.npz")
    assert set(whole.files) == set(cont.files)
    worst = max(float(np.max(np.abs(whole[k] - cont[k]))) for k in whole.files)
    # measured: up to 7.2e-6 on weights of about 0.1 (the resumed run's first downlink is
    # dense, the other's stacked, and the nodes' replies stack in another order: the same
    # sums in another order differ in the last float bits, and two more rounds train on them)
    assert worst < 5e-5, worst
    a, b = _rows(uninterrupted / "metrics.csv"), _rows(run_dir / "metrics.csv")
    assert [r["round"] for r in b] == ["0", "1", "2", "3", "4"]  # no round twice, none missing
    assert [r["eval_accuracy"] for r in a] == [r["eval_accuracy"] for r in b]
    assert [float(r["eval_loss"]) for r in a] == pytest.approx([float(r["eval_loss"]) for r in b], abs=1e-5)


def test_resumed_tables_continue(resumed):
    run_dir, _ = resumed
    assert [r["round"] for r in _rows(run_dir / "rounds.csv")] == ["1", "2", "3", "4"]
    clients = _rows(run_dir / "clients.csv")
    assert sorted(r["round"] for r in clients) == ["1", "1", "2", "2", "3", "3", "4", "4"]
    # the nodes registered again under new ids; the rows of rounds 1-2 carry their new ids
    assert len({r["node_id"] for r in clients}) == 2
    profiles = json.loads((run_dir / "profiles.json").read_text())
    assert {r["node_id"] for r in clients} == set(profiles)
    (entry,) = json.loads((run_dir / "resumes.json").read_text())
    assert entry["after-round"] == 2
    # round 3 went to every node dense: no node holds anything of a new Flower run
    (r3,) = [r for r in _rows(run_dir / "metrics.csv") if r["round"] == "3"]
    (r4,) = [r for r in _rows(run_dir / "metrics.csv") if r["round"] == "4"]
    assert int(r3["downlink_bytes"]) > 5 * int(r4["downlink_bytes"])


def _heldout(run_dir: Path, path: Path) -> tuple[Path, int]:
    """The held-out examples the server evaluated on, as a JSON file a user's script reads."""
    cfg = StamenConfig.from_run_config(tomllib.loads((run_dir / "run-config.toml").read_text()))
    _, split = build_task(cfg)
    data = evaluated_split(cfg, split.test)
    path.write_text(json.dumps({"texts": list(data.texts), "labels": [int(x) for x in data.labels]}))
    return path, cfg.eval.batch_size


def _as_hf_user(kind: str, model_dir: Path, heldout: Path, batch: int, cwd: Path) -> dict:
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "hf_user.py"), kind, str(model_dir), str(heldout), str(batch)],
                         cwd=cwd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_final_model_opens_with_transformers_and_reproduces_the_accuracy(resumed, tmp_path):
    run_dir, _ = resumed
    heldout, batch = _heldout(run_dir, tmp_path / "heldout.json")
    got = _as_hf_user("merged", run_dir / "final" / "model", heldout, batch, tmp_path)
    last = _rows(run_dir / "metrics.csv")[-1]
    assert got["project_modules"] == []
    assert got["accuracy"] == float(last["eval_accuracy"])
    assert got["labels"] == {"0": "business", "1": "entertainment", "2": "politics", "3": "sports", "4": "tech"}
    assert not (run_dir / "config.json").exists()  # the run directory is not mistaken for a model
    accuracies = [float(r["eval_accuracy"]) for r in _rows(run_dir / "metrics.csv")]
    best = accuracies.index(max(accuracies))
    if best == 4:
        assert (run_dir / "best").is_symlink() and (run_dir / "best" / "model" / "config.json").is_file()
    elif best > 0:
        assert (run_dir / "best" / "model" / "config.json").is_file() and not (run_dir / "best").is_symlink()



def test_fedspine_resumes_its_bandits(pair, tmp_path_factory):
    """FedSpine killed after round 1 of 3 and resumed ends where the uninterrupted run does: the same arms every round and the same model. Its rewards here
    are the loss improvement alone (time-weight 0): measured round times differ from run
    to run, and with them the arms."""
    config = SHORT + ' strategy.name="fedspine" fedspine.time-weight=0.0 fedspine.ratios="0 0.25" fedspine.ranks="2 4"'
    whole = _whole(pair, tmp_path_factory.mktemp("fedspine-whole"), config)
    run_dir, crashed = _crash_and_resume(tmp_path_factory.mktemp("fedspine-crashed"), config, after_round=1)
    assert "3" not in crashed

    def arms(d):
        part = {int(p["partition-id"]): n for n, p in json.loads((d / "profiles.json").read_text()).items()}
        node_part = {n: k for k, n in part.items()}
        return sorted((r["round"], node_part[r["node_id"]], r["ratio"], r["rank"]) for r in _rows(d / "arms.csv"))

    assert arms(whole) == arms(run_dir) and len(arms(whole)) == 6  # 2 nodes x 3 rounds, the same choices
    a, b = np.load(whole / "global_model.npz"), np.load(run_dir / "global_model.npz")
    assert max(float(np.max(np.abs(a[k] - b[k]))) for k in a.files) < 5e-5


def test_local_dp_epsilon_continues_and_the_flexlora_adapter_opens_with_peft(tmp_path_factory, flower_programs):
    """FlexLoRA with DP-SGD on every node, killed after round 1 of 3 and resumed (a new
    Flower run, so a new run id for the ledgers): the nodes continue
    their privacy ledgers (on their disks, named by the run's first id), so their steps and
    epsilon go on from round 1's instead of restarting, and no node is refused. Then its adapter, as the run wrote it and through `stamen export`, opens with
    peft alone and reproduces metrics.csv's accuracy."""
    from opacus.accountants import RDPAccountant

    out = tmp_path_factory.mktemp("flexlora-dp")
    run_dir, _ = _crash_and_resume(out, SHORT + ' strategy.name="flexlora" dp.mode="local" dp.noise-multiplier=1.0', 1)
    rows = _rows(run_dir / "privacy.csv")
    assert {r["status"] for r in rows} == {"trained"}
    by_node: dict[str, list[dict]] = {}
    for r in rows:
        by_node.setdefault(r["node_id"], []).append(r)
    assert len(by_node) == 2  # the nodes' rows of round 1 carry their new ids
    for node_rows in by_node.values():
        assert [r["round"] for r in node_rows] == ["1", "2", "3"]
        assert [int(r["steps"]) for r in node_rows] == [2, 4, 6]  # 2 local steps a round, not restarted at round 2
        last = node_rows[-1]
        accountant = RDPAccountant()
        accountant.history = [(1.0, float(last["sample_rate"]), 6)]
        assert float(last["epsilon"]) == pytest.approx(accountant.get_epsilon(float(last["delta"])), rel=1e-6)

    heldout, batch = _heldout(run_dir, out / "heldout.json")
    last = float(_rows(run_dir / "metrics.csv")[-1]["eval_accuracy"])
    got = _as_hf_user("adapter", run_dir / "final" / "adapter", heldout, batch, out)
    assert got["project_modules"] == [] and got["accuracy"] == last
    # `stamen export` of the last round writes the same adapter (checked above as a user would)
    from safetensors.numpy import load_file

    assert main(["export", str(run_dir), "--round", "3", "--format", "adapter", "--out", str(out / "exported")]) == 0
    ours, theirs = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (run_dir / "final", out / "exported"))
    assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in ours)
