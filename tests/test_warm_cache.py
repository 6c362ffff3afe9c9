"""ml/cache.py: what the warm runtime keeps between the messages of a run, keyed by run
id and config, never shared across runs, and off outside the warm runtime."""

import os

import pytest

from ml import cache


@pytest.fixture()
def builds():
    """A builder that makes a new object per call and counts its calls."""
    made = []

    def build(tag="x"):
        obj = {"tag": tag, "n": len(made)}
        made.append(obj)
        return obj

    cache.clear()
    yield build, made
    cache.clear()


def test_off_without_the_runtime_builds_every_time(builds, monkeypatch):
    build, made = builds
    monkeypatch.delenv(cache.ENV_VAR, raising=False)
    a, b = cache.cached(("k",), build), cache.cached(("k",), build)
    assert a is not b and len(made) == 2


def test_within_a_run_one_build_per_key(builds, monkeypatch):
    build, made = builds
    monkeypatch.setenv(cache.ENV_VAR, "101")
    a, b = cache.cached(("model", "cfg-A"), build), cache.cached(("model", "cfg-A"), build)
    assert a is b and len(made) == 1
    c = cache.cached(("model", "cfg-B"), lambda: build("B"))  # another config: its own object
    assert c is not a and c["tag"] == "B" and len(made) == 2


def test_a_new_run_gets_neither_the_old_model_nor_its_data(builds, monkeypatch):
    build, made = builds
    monkeypatch.setenv(cache.ENV_VAR, "101")
    model1, data1 = cache.cached(("model", "cfg"), build), cache.cached(("data", "cfg"), build)
    monkeypatch.setenv(cache.ENV_VAR, "202")  # same keys, another run
    model2, data2 = cache.cached(("model", "cfg"), build), cache.cached(("data", "cfg"), build)
    assert model2 is not model1 and data2 is not data1 and len(made) == 4
    monkeypatch.setenv(cache.ENV_VAR, "101")  # run 101's entries were dropped, not kept aside
    assert cache.cached(("model", "cfg"), build) is not model1 and len(made) == 5


def test_once_entries_are_handed_out_once_in_another_process(builds, monkeypatch):
    """The executor builds the model; a worker takes it once, and a second request in the
    same worker builds a fresh one (as a cold process would), so a model the handler
    changed is never handed out again."""
    build, made = builds
    monkeypatch.setenv(cache.ENV_VAR, "7")
    executor_copy = cache.cached(("model",), build, once=True)
    assert cache.cached(("model",), build, once=True) is executor_copy  # the builder may ask again
    real_pid = os.getpid()
    monkeypatch.setattr(cache.os, "getpid", lambda: real_pid + 1)  # now "a forked worker"
    assert cache.cached(("model",), build, once=True) is executor_copy  # the preloaded one, once
    second = cache.cached(("model",), build, once=True)
    assert second is not executor_copy and len(made) == 2
    # entries without once are shared as often as asked
    data = cache.cached(("data",), build)
    assert cache.cached(("data",), build) is data


def test_forked_worker_changes_do_not_reach_the_executor(builds, monkeypatch):
    """A real fork: the worker mutates the object it was handed; the parent's is untouched."""
    build, _ = builds
    monkeypatch.setenv(cache.ENV_VAR, "9")
    model = cache.cached(("model",), build, once=True)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            mine = cache.cached(("model",), build, once=True)
            mine["tag"] = "changed by the worker"
            again = cache.cached(("model",), build, once=True)
            os.write(write_end, b"1" if (mine is model and again is not model) else b"0")
        finally:
            os._exit(0)
    os.close(write_end)
    answer = os.read(read_end, 1)
    os.waitpid(pid, 0)
    assert answer == b"1"
    assert model["tag"] == "x" and cache.cached(("model",), build, once=True) is model


def test_app_keys_separate_configs_and_runs(monkeypatch, run_config):
    """client_app's task/partition cache: another data seed or another partition is another
    entry; a second run rebuilds the task and the partition."""
    from client_app.task import task_and_partition
    from stamen.config import StamenConfig

    class Ctx:
        def __init__(self, pid):
            self.node_config = {"partition-id": pid, "num-partitions": 4}

    cache.clear()
    monkeypatch.setenv(cache.ENV_VAR, "1")
    cfg = StamenConfig.from_run_config(run_config)
    task, data = task_and_partition(Ctx(0), cfg)
    again_task, again_data = task_and_partition(Ctx(0), cfg)
    assert again_task is task and again_data is data
    other_seed = StamenConfig.from_run_config({**run_config, "data.seed": 1234})
    _, data_seed = task_and_partition(Ctx(0), other_seed)
    _, data_other_node = task_and_partition(Ctx(1), cfg)
    assert data_seed is not data and data_other_node is not data
    assert sorted(data_seed.labels.tolist()) != sorted(data.labels.tolist()) or len(data_seed) != len(data)
    monkeypatch.setenv(cache.ENV_VAR, "2")
    task2, data2 = task_and_partition(Ctx(0), cfg)
    assert task2 is not task and data2 is not data
    assert list(data2.labels) == list(data.labels)  # the same partition, rebuilt, not shared
    cache.clear()


def test_preload_fills_what_the_train_handler_takes(monkeypatch, run_config):
    """client_app.preload builds the task, the node's partition and the base model into
    the cache; the handler's own calls then find them (the model once)."""
    from client_app.app import preload
    from client_app.task import task_and_partition
    from stamen.config import StamenConfig

    base_config = dict(run_config)

    class Ctx:
        node_config = {"partition-id": 1, "num-partitions": 4}
        run_config = base_config

    cache.clear()
    monkeypatch.setenv(cache.ENV_VAR, "5")
    preload(Ctx())
    kinds = sorted(key[1] for key in cache._entries)
    assert kinds == ["model", "partition", "task"]
    cfg = StamenConfig.from_run_config(run_config)
    task, data = task_and_partition(Ctx(), cfg)
    model_key = ("5", "model", cfg.model, cfg.data)
    assert cache._entries[("5", "task", cfg.model, cfg.data)][0] is task and model_key in cache._entries
    cache.clear()
    monkeypatch.setenv(cache.ENV_VAR, "6")
    vit = "vit:image_size=8,patch_size=2,num_channels=1,hidden_size=16,num_hidden_layers=2,num_attention_heads=2,intermediate_size=32"
    Ctx.run_config = {**run_config, "strategy.name": "reefl", "model.path": vit, "model.task": "image-classification", "data.name": "digits"}
    preload(Ctx())
    assert "model" not in {key[1] for key in cache._entries}  # early exit builds its model from the backbone
    cache.clear()
