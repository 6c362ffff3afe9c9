"""Settable polls: the SuperNode's two sleeps, the executor stamen-supernode starts, and the
ServerApp grid's reply poll (device_runtime/supernode.py, server_app/grid.py)."""

import argparse
import types

import pytest

from device_runtime import supernode as runtime
from server_app.grid import PolledGrid


def test_polled_time_maps_flowers_two_sleeps_and_passes_the_rest(monkeypatch):
    slept = []
    monkeypatch.setattr(runtime.time, "sleep", slept.append)
    clock = runtime._PolledTime(runtime.NodePolls(idle=0.2, reply=0.01, task=0.05))
    clock.sleep(3)  # idle: no message at the SuperLink
    clock.sleep(0.5)  # waiting for the ClientApp's reply
    clock.sleep(1.25)  # any other sleep is left alone
    assert slept == [0.2, 0.01, 1.25]
    assert clock.time is runtime.time.time and clock.monotonic is runtime.time.monotonic


def test_the_installed_flower_still_has_the_mapped_sleeps_and_launch():
    runtime.check_flower()  # flwr 1.39.0: passes


def test_a_flower_without_them_is_refused(monkeypatch):
    monkeypatch.setattr(runtime.inspect, "getsource", lambda module: "while True:\n    time.sleep(5)\n")
    with pytest.raises(RuntimeError, match=r"lacks time\.sleep\(3\).*--no-warm"):
        runtime.check_flower()


@pytest.mark.parametrize("bad", [0.0, -1.0, 61.0])
def test_polls_are_bounded(bad):
    with pytest.raises(ValueError, match="idle poll"):
        runtime.NodePolls(idle=bad, reply=0.05, task=0.05)


class _Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, args, **kwargs):
        self.calls.append((list(args), kwargs))
        return types.SimpleNamespace(wait=lambda: 0, pid=0)


def test_warm_launch_replaces_superexec_with_the_warm_executor(monkeypatch):
    popen = _Recorder()
    monkeypatch.setattr(runtime.subprocess, "Popen", popen)
    monkeypatch.setattr(runtime.threading, "Thread", lambda **kw: types.SimpleNamespace(start=lambda: None))
    launcher = runtime._ExecutorLauncher(True, runtime.NodePolls(idle=0.5, reply=0.05, task=0.03))
    launcher.Popen(["flower-superexec", "--insecure", "--runtime-api-address", "127.0.0.1:9094", "--parent-pid", "42"])
    (args, _), = popen.calls
    assert args[1:3] == ["-m", "device_runtime.executor"]
    assert args[3:] == ["--insecure", "--runtime-api-address", "127.0.0.1:9094", "--parent-pid", "42", "--poll", "0.03"]
    launcher.Popen(["uv", "sync"])  # anything else is started as asked
    assert popen.calls[1][0] == ["uv", "sync"]


def test_cold_launch_keeps_superexec_and_sets_its_poll(monkeypatch):
    popen = _Recorder()
    monkeypatch.setattr(runtime.subprocess, "Popen", popen)
    launcher = runtime._ExecutorLauncher(False, runtime.NodePolls(idle=3, reply=0.5, task=0.25))
    launcher.Popen(["flower-superexec", "--insecure"])
    (args, kwargs), = popen.calls
    assert args == ["flower-superexec", "--insecure"]
    assert kwargs["env"][runtime.TASK_POLL_ENV] == "0.25"


class _ReplyingGrid:
    """Replies to the pushed messages: one on the first pull, the other on the third."""

    def __init__(self):
        self.pulls = 0

    def push_messages(self, messages):
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, ids):
        self.pulls += 1
        ready = {1: ["a"], 3: ["b"]}.get(self.pulls, [])
        return [
            types.SimpleNamespace(metadata=types.SimpleNamespace(reply_to_message_id=i, src_node_id=7), has_error=lambda: False)
            for i in ready if i in ids
        ]

    def get_node_ids(self):
        return [7]


def _msg(mid):
    return types.SimpleNamespace(metadata=types.SimpleNamespace(message_id=mid, dst_node_id=7))


def test_polled_grid_pulls_every_poll_interval_until_all_replied(monkeypatch):
    slept = []
    monkeypatch.setattr("server_app.grid.time.sleep", slept.append)
    inner = _ReplyingGrid()
    grid = PolledGrid(inner, 0.25)
    replies = grid.send_and_receive([_msg("a"), _msg("b")], timeout=None)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["a", "b"]
    assert inner.pulls == 3 and slept == [0.25, 0.25]  # Flower's loop would sleep 3 s each time
    assert grid.get_node_ids() == [7]  # everything else goes to the wrapped grid


def test_polled_grid_stops_at_the_timeout(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("server_app.grid.time.time", lambda: now[0])
    monkeypatch.setattr("server_app.grid.time.sleep", lambda s: now.__setitem__(0, now[0] + s))
    inner = _ReplyingGrid()
    replies = PolledGrid(inner, 1.0).send_and_receive([_msg("a"), _msg("b")], timeout=1.5)
    assert [r.metadata.reply_to_message_id for r in replies] == ["a"] and inner.pulls == 2


def test_an_error_the_superlink_writes_is_attributed_to_the_node_it_is_about():
    """A node that died: the SuperLink answers its instruction with NODE_UNAVAILABLE from
    node id 1 (itself). The strategies must see the dead node, not node 1."""
    from flwr.app import Error, Metadata
    from flwr.app.message import make_message
    from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode

    from server_app.grid import attribute_superlink_errors

    def reply(src, to, error=True):
        meta = Metadata(run_id=1, message_id=f"r-{to}", src_node_id=src, dst_node_id=SUPERLINK_NODE_ID,
                        reply_to_message_id=to, group_id="2", created_at=0.0, ttl=30.0, message_type="train")
        return make_message(meta, error=Error(ErrorCode.NODE_UNAVAILABLE, "gone")) if error else types.SimpleNamespace(metadata=meta, has_error=lambda: False)

    sent = {"i-42": 42, "i-43": 43}
    out = attribute_superlink_errors([reply(SUPERLINK_NODE_ID, "i-42"), reply(43, "i-43", error=False), reply(SUPERLINK_NODE_ID, "other")], sent)
    assert [m.metadata.src_node_id for m in out] == [42, 43, SUPERLINK_NODE_ID]  # an unknown instruction: left as it is
    assert out[0].error.code == ErrorCode.NODE_UNAVAILABLE and out[0].metadata.reply_to_message_id == "i-42"
    assert out[0].metadata.group_id == "2" and out[0].metadata.message_type == "train"


def test_grid_poll_is_a_validated_config_key(run_config):
    from stamen.config import ConfigError, StamenConfig

    assert StamenConfig.from_run_config(run_config).strategy.poll_interval == 0.2
    with pytest.raises(ConfigError, match="strategy.poll-interval"):
        StamenConfig.from_run_config({**run_config, "strategy.poll-interval": 0.0})


def test_warm_install_retries_missing_objects_quickly_and_cold_keeps_flowers(monkeypatch):
    """The SuperLink offers a message before it has all of its objects: the warm node
    retries them after 20 ms (doubling to 200 ms), where flwr waits 1 s (doubling to 10 s)."""
    loop = runtime.flower_loop
    for name in ("time", "subprocess", "pull_objects"):
        monkeypatch.setattr(loop, name, getattr(loop, name))  # undone after the test
    runtime.install(warm=False, polls=runtime.FLOWER_POLLS)
    assert loop.pull_objects is runtime.flower_pull_objects
    runtime.install(warm=True, polls=runtime.WARM_POLLS)
    assert loop.pull_objects.func is runtime.flower_pull_objects
    assert loop.pull_objects.keywords == {"initial_backoff": 0.02, "backoff_cap": 0.2, "max_tries_per_object": None}
    assert isinstance(loop.time, runtime._PolledTime) and isinstance(loop.subprocess, runtime._ExecutorLauncher)


def test_short_grid_poll_shortens_the_servers_object_retries(monkeypatch):
    from flwr.superlink.grid import http_grid

    from server_app import grid as polled

    monkeypatch.setattr(http_grid, "pull_objects", polled.flower_pull_objects)
    PolledGrid(object(), 3.0)  # Flower's poll: Flower's retries
    assert http_grid.pull_objects is polled.flower_pull_objects
    PolledGrid(object(), 0.5)
    assert http_grid.pull_objects.keywords["initial_backoff"] == 0.02


def test_transfer_concurrency_reaches_flowers_push_and_pull_uncapped(monkeypatch):
    """--transfer-concurrency N: N object RPCs in flight per transfer, even above the CPU
    count Flower caps it at, and Flower's environment variables for the processes the
    node starts."""
    import os
    import threading

    loop = runtime.flower_loop
    for name in ("time", "subprocess", "pull_objects", "push_object_contents_from_iterable"):
        monkeypatch.setattr(loop, name, getattr(loop, name))
    monkeypatch.setattr(runtime.inflatable_utils, "get_num_workers", runtime.inflatable_utils.get_num_workers)
    for name in runtime.CONCURRENCY_ENVS:
        monkeypatch.delenv(name, raising=False)
    n = (os.cpu_count() or 1) + 2  # more than Flower would allow on this machine
    runtime.install(warm=True, polls=runtime.WARM_POLLS, concurrency=n)
    assert loop.pull_objects.keywords["max_concurrent_pulls"] == n
    assert loop.pull_objects.keywords["initial_backoff"] == 0.02  # the warm retries stay
    assert all(os.environ[name] == str(n) for name in runtime.CONCURRENCY_ENVS)

    in_flight = threading.Barrier(n, timeout=10)  # passes only if n pushes run at once
    pushed = []

    def push(object_id, content):
        in_flight.wait()
        pushed.append(object_id)

    loop.push_object_contents_from_iterable(((str(i), b"x") for i in range(n)), push)
    assert sorted(pushed) == sorted(str(i) for i in range(n))


@pytest.mark.parametrize("bad", ["0", "65", "two"])
def test_transfer_concurrency_is_bounded(bad):
    with pytest.raises(argparse.ArgumentTypeError, match="must be"):
        runtime.transfer_concurrency(bad)


def test_warm_nodes_default_to_eight_transfers_in_flight_and_cold_ones_to_flowers():
    from cli.supernode import measurement_parser, runtime_settings

    def settings(*flags):
        return runtime_settings(measurement_parser().parse_known_args(list(flags))[0])

    assert settings()[1] == 8 and settings()[0] == runtime.WARM_POLLS
    assert settings("--no-warm") == (runtime.FLOWER_POLLS, None)
    assert settings("--no-warm", "--transfer-concurrency", "3")[1] == 3
    assert settings("--transfer-concurrency", "1")[1] == 1
