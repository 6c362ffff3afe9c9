"""What ``stamen-supernode`` changes in flwr 1.39's SuperNode, which runs in its process:
its polls, the executor it starts, and how soon it asks again for a missing object.

flwr 1.39 has no setting for any of them (``flwr/supernode/start_client_internal.py``):

* the SuperNode's loop sleeps ``time.sleep(3)`` after a pull that found no message (the
  idle poll), and ``time.sleep(0.5)`` between looks for the ClientApp's reply and for its
  objects in the node's store (the reply poll);
* it starts ``flower-superexec`` with ``subprocess.Popen``; SuperExec polls for tasks
  every ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` seconds (default 1);
* it pulls a message's objects with ``pull_objects``, which retries an object the
  SuperLink does not have yet after 1 s, doubling. The SuperLink offers a message before
  the ServerApp has pushed all of its objects, so a node that polls often meets that in
  most rounds: a 0.45 MB downlink measured 0.8-1.25 s, waiting on that retry.

So ``install`` replaces that module's ``time`` and ``subprocess`` names with two small
stand-ins: one maps those two sleeps to the configured polls (every other use of
``time`` passes through), the other starts the warm executor (``executor.py``) with the
same flags in place of ``flower-superexec``, restarts it if it dies, or, with
``warm=False``, starts ``flower-superexec`` itself with the task poll in its environment.
With the warm runtime it also gives ``pull_objects`` a retry of 20 ms, doubling up to
200 ms (``--no-warm`` keeps Flower's).
``check_flower`` refuses a flwr whose loop no longer has those sleeps, so an upgrade
cannot silently undo the settings.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import subprocess
import sys
import threading
import time

import flwr
from flwr.supercore.inflatable import inflatable_utils
from flwr.supercore.inflatable.inflatable_utils import pull_objects as flower_pull_objects
from flwr.supercore.inflatable.inflatable_utils import push_object_contents_from_iterable as flower_push_contents
from flwr.supernode import start_client_internal as flower_loop

from .polls import FLOWER_IDLE_POLL_S, FLOWER_POLLS, FLOWER_REPLY_POLL_S, WARM_POLLS, WARM_TRANSFER_CONCURRENCY, NodePolls, poll_seconds, transfer_concurrency  # noqa: F401 - the SuperNode's names

log = logging.getLogger("stamen.runtime")

TASK_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
# Flower's own settings for the object RPCs in flight per transfer (read when flwr is
# imported, so they reach the processes this one starts: the executor and its workers)
CONCURRENCY_ENVS = ("FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PUSHES", "FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PULLS")
OBJECT_RETRY_S, OBJECT_RETRY_CAP_S = 0.02, 0.2  # for an object the SuperLink does not have yet
RESTARTS = 5  # executor restarts allowed within RESTART_WINDOW_S before the node gives up on it
RESTART_WINDOW_S = 60.0


class _PolledTime:
    """``time`` for the SuperNode's loop, with its two poll sleeps replaced."""

    def __init__(self, polls: NodePolls) -> None:
        self._sleeps = {FLOWER_IDLE_POLL_S: polls.idle, FLOWER_REPLY_POLL_S: polls.reply}

    def sleep(self, seconds: float) -> None:
        time.sleep(self._sleeps.get(seconds, seconds))

    def __getattr__(self, name: str):
        return getattr(time, name)


class _ExecutorLauncher:
    """``subprocess`` for the SuperNode: its ``Popen(["flower-superexec", ...])`` starts the
    executor this node uses; every other name passes through."""

    def __init__(self, warm: bool, polls: NodePolls) -> None:
        self.warm, self.polls = warm, polls

    def __getattr__(self, name: str):
        return getattr(subprocess, name)

    def Popen(self, args, **kwargs):  # noqa: N802 - subprocess's name
        if not args or args[0] != "flower-superexec":
            return subprocess.Popen(args, **kwargs)
        if not self.warm:
            env = {**(kwargs.pop("env", None) or os.environ), TASK_POLL_ENV: str(self.polls.task)}
            return subprocess.Popen(args, env=env, **kwargs)
        command = [sys.executable, "-m", "device_runtime.executor", *args[1:], "--poll", str(self.polls.task)]
        proc = subprocess.Popen(command, **kwargs)
        threading.Thread(target=self._supervise, args=(proc, command, kwargs), name="stamen-executor", daemon=True).start()
        return proc

    @staticmethod
    def _supervise(proc: subprocess.Popen, command: list[str], kwargs: dict) -> None:
        """Restart the executor if it dies (its in-flight message, if any, is answered by
        Flower when the task's heartbeat expires); give up after RESTARTS quick deaths."""
        deaths: list[float] = []
        while True:
            code = proc.wait()
            now = time.monotonic()
            deaths = [t for t in deaths if now - t < RESTART_WINDOW_S] + [now]
            if len(deaths) > RESTARTS:
                log.error("the warm executor died %d times within %.0f s (last exit code %s); not restarting it", len(deaths), RESTART_WINDOW_S, code)
                return
            log.warning("the warm executor exited with code %s; restarting it", code)
            proc = subprocess.Popen(command, **kwargs)


def check_flower() -> None:
    """Refuse a flwr whose SuperNode loop lacks the sleeps and the Popen this module maps."""
    source = inspect.getsource(flower_loop)
    needed = ["time.sleep(3)", "time.sleep(0.5)", 'command = ["flower-superexec"]', "subprocess.Popen(command)", "obj_contents = pull_objects(",
              "push_object_contents_from_iterable("]
    missing = [n for n in needed if n not in source]
    if missing:
        raise RuntimeError(
            f"stamen-supernode maps flwr 1.39's SuperNode loop, but flwr {flwr.__version__}'s lacks {', '.join(missing)}: "
            "pin flwr==1.39.0 or run with --no-warm and Flower's polls"
        )


def install(*, warm: bool, polls: NodePolls, concurrency: int | None = None) -> None:
    """Apply the polls, the executor choice and the transfer concurrency to flwr's
    SuperNode loop in this process.

    ``concurrency``: object RPCs in flight per downlink and uplink on the Fleet link
    (None: Flower's, ``min(2, cpu_count)``). Flower caps the count at the CPU count; a
    transfer waits on the network, not on a core, so here it is not capped. It also goes
    into Flower's environment variables for the processes this node starts."""
    check_flower()
    flower_loop.time = _PolledTime(polls)
    flower_loop.subprocess = _ExecutorLauncher(warm, polls)
    pulls: dict = {}
    if warm:
        pulls.update(initial_backoff=OBJECT_RETRY_S, backoff_cap=OBJECT_RETRY_CAP_S, max_tries_per_object=None)
    if concurrency is not None:
        pulls["max_concurrent_pulls"] = concurrency
        flower_loop.push_object_contents_from_iterable = functools.partial(flower_push_contents, max_concurrent_pushes=concurrency)
        inflatable_utils.get_num_workers = _uncapped_workers
        for name in CONCURRENCY_ENVS:
            os.environ[name] = str(concurrency)
    if pulls:
        flower_loop.pull_objects = functools.partial(flower_pull_objects, **pulls)


def _uncapped_workers(max_concurrent: int) -> int:
    """Flower's ``get_num_workers`` without the CPU-count cap."""
    return max(1, int(max_concurrent))
