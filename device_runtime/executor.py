"""The warm executor: what ``stamen-supernode`` runs in place of ``flower-superexec``.

Flower 1.39's SuperNode starts ``flower-superexec``, which polls the SuperNode's Runtime
API for tasks (every 1 s) and starts a fresh ``flwr-clientapp`` process for each message:
Python, torch, transformers and peft are imported, and the base model and the node's data
partition loaded, for every message, on the round's critical path.

This executor takes the same flags and serves the same tasks, as a prestarted worker
forked from a warm parent (docs/runtime.md has the measurements behind the choice):

1. At start it imports the libraries a Stamen ClientApp uses (``LIBRARIES``), with torch
   pinned to one thread: GNU OpenMP, torch's CPU thread pool, does not survive a fork
   once it has started threads (a forked child then hangs in its first parallel op).
2. It polls ``AcquireTask`` every ``--poll`` seconds. For a task it pulls the task's
   inputs (Context, Run, FAB) itself.
3. The first task of a run binds the executor to that run: it installs the FAB and
   imports the ClientApp from it as ``flwr-clientapp`` would, and calls the ClientApp
   module's ``preload(context)`` if it has one (``client_app/app.py``: the task, the data
   split, the node's partition, the base model, kept in ``ml/cache.py``).
4. Each message is served by a worker forked from the executor (``worker.py``): one
   process per message, as Flower intends, but one that starts in milliseconds with
   everything above in its memory, shared copy-on-write with the executor, so the base
   model is not copied per message, and what a message changes dies with its worker.
   The worker restores torch's thread count and marks its start ``warm`` (the run was
   preloaded) or ``forked`` (it was not: no ``preload``, or it failed).
5. A task of another run makes the executor replace itself (``exec``) with a fresh one
   that serves that task first: a new run never sees another run's modules or objects.
6. If a worker dies before it replies, the executor answers the message with a
   ``CLIENT_APP_CRASHED`` error reply at once (Flower itself would after the task's
   heartbeat expired) and serves the next message: a crash costs one reply.

Only this module and ``worker.py`` know Flower's Runtime API; the ClientApp keeps
Flower's API (handlers, mods, ``context.state``) and runs unchanged under either
executor. CUDA is never touched here: a worker moves its own model to the GPU.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import struct
import sys
import threading
import time

from flwr.cli.install import install_from_fab
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.config import get_project_config, get_project_dir
from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
from flwr.proto.runtime_pb2 import AcquireTaskRequest, PullTaskInputRequest  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.tls import validate_and_resolve_root_certificates

from . import worker
from .polls import WARM_POLLS, poll_seconds

LIBRARIES = ("numpy", "torch", "transformers", "peft", "datasets", "flwr_datasets", "psutil")
START_ENV = "STAMEN_START"  # warm | forked in a worker; unset (cold) in flwr-clientapp
CACHE_ENV = "STAMEN_WARM_RUN"  # ml/cache.py's ENV_VAR (this module must not import ml: see __init__)
log = logging.getLogger("stamen.runtime")

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="stamen-executor",
        description="Stamen's warm executor (runs in place of flower-superexec; started by stamen-supernode)",
    )
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, HOST:PORT")
    security = parser.add_mutually_exclusive_group()
    security.add_argument("--insecure", action="store_true", help="plain HTTP to the Runtime API")
    security.add_argument("--root-certificates", default=None, help="CA certificate of the Runtime API's TLS")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process (the SuperNode) exits")
    parser.add_argument("--poll", type=poll_seconds, default=WARM_POLLS.task, help=f"seconds between two AcquireTask polls (default {WARM_POLLS.task})")
    parser.add_argument("--token", default=None, help=argparse.SUPPRESS)  # a task to serve first (after exec)
    parser.add_argument(
        "--allow-runtime-dependency-installation", action="store_true", help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.allow_runtime_dependency_installation:
        parser.error("the warm executor serves apps from the node's environment: runtime dependency installation needs --no-warm")
    return args


def warm_libraries() -> int:
    """Import ``LIBRARIES``; returns torch's default thread count (restored in workers)."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # is_available() without initialising CUDA
    for name in LIBRARIES:
        try:
            importlib.import_module(name)
        except ImportError:
            log.info("warm executor: %s is not installed, not preloaded", name)
    threads = 0
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # see the module docstring, point 1
    return threads


class Executor:
    """The loop of the module docstring; ``serve_one`` is one task."""

    def __init__(self, args: argparse.Namespace, default_threads: int) -> None:
        self.args = args
        self.default_threads = default_threads
        self.certificates = validate_and_resolve_root_certificates(args.root_certificates, args.insecure)
        self.client = self._client(RuntimeVersionHttpInterceptor(component_name="SuperExec"))
        self.run_id: int | None = None  # the run this executor is bound to
        self.warm = False  # whether that run's preload succeeded
        self.app = None
        self.app_error = ""  # why the run's ClientApp could not be loaded

    def _client(self, *interceptors) -> RuntimeHttpClient:
        return RuntimeHttpClient.from_server_address(
            server_address=self.args.runtime_api_address,
            insecure=self.args.insecure,
            root_certificates=self.certificates,
            interceptors=list(interceptors),
            retry_invoker=make_simple_http_retry_invoker(),
        )

    def task_client(self, token: str) -> RuntimeHttpClient:
        return self._client(RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), RuntimeTokenHttpInterceptor(token))

    def loop(self, first_token: str | None = None) -> None:
        if first_token:
            self.serve_one(first_token, run_id=None)
        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        while True:
            res = self.client.AcquireTask(request)
            if res.HasField("task") and res.token:
                self.serve_one(res.token, run_id=int(res.task.run_id))
            else:
                time.sleep(self.args.poll)

    def serve_one(self, token: str, run_id: int | None) -> None:
        if run_id is not None and self.run_id not in (None, run_id):
            self.replace_self(token, run_id)
        client = self.task_client(token)
        try:
            res = client.PullTaskInput(PullTaskInputRequest())
            context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
            if self.run_id is None:
                self.bind(client, context, run, fab)
            self.fork_worker(client, token, int(res.task_id), context)
        finally:
            client.close()

    def bind(self, client: RuntimeHttpClient, context, run, fab) -> None:
        """Install the run's FAB, import its ClientApp as flwr-clientapp would, and call the
        ClientApp module's ``preload(context)``, heartbeating the task meanwhile. If the
        app cannot be loaded, every worker of this run replies with that error, as
        flwr-clientapp would."""
        self.run_id = int(run.run_id)
        os.environ[CACHE_ENV] = str(self.run_id)
        try:
            install_from_fab(fab.content, skip_prompt=True)
            self.app = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)(
                run.fab_id, run.fab_version, fab.hash_str
            )
            project = get_project_config(get_project_dir(run.fab_id, run.fab_version, fab.hash_str))
            module = project["tool"]["flwr"]["app"]["components"]["clientapp"].partition(":")[0]
        except Exception as err:  # noqa: BLE001 - the workers reply with it
            log.exception("run %s: the ClientApp could not be loaded", self.run_id)
            self.app_error = f"{type(err)}:<'{err}'>"
            return
        preload = getattr(sys.modules[module], "preload", None)
        if preload is None:
            log.info("run %s: %s has no preload(context); workers start with the libraries only", self.run_id, module)
            return
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        started = time.perf_counter()
        try:
            preload(context)
            self.warm = True
            log.info("run %s: preloaded in %.2f s", self.run_id, time.perf_counter() - started)
        except Exception:  # the message still runs; its handler meets the same problem and replies with it
            log.exception("run %s: preload failed; workers load for themselves", self.run_id)
        finally:
            if heartbeat.is_running:
                heartbeat.stop()  # no thread of ours may run across the fork

    def fork_worker(self, client: RuntimeHttpClient, token: str, task_id: int, context) -> None:
        """Serve the task in a forked worker; answer for it if it dies before replying."""
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker
            os.close(read_end)
            os._exit(self._worker(token, task_id, context, write_end))
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            frames = _read_frames(pipe.read())
        _, status = os.waitpid(pid, 0)
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) in (worker.OK, worker.FAILED):
            return
        how = f"was killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exited with code {os.WEXITSTATUS(status)}"
        reason = f"ClientApp worker {pid} {how} before it replied"
        if worker.PUSHED in frames[1:]:
            log.error("%s; its reply had been sent", reason)
        elif frames:
            log.error("%s; answering its message with an error reply", reason)
            try:
                worker.answer_crash(client, context, frames[0], reason)
            except Exception:  # noqa: BLE001 - Flower still answers it when the task expires
                log.exception("could not answer for the dead worker")
        else:
            log.error("%s, before it had the message; Flower answers it when the task expires", reason)

    def _worker(self, token: str, task_id: int, context, pipe_fd: int) -> int:
        code = worker.NOT_PUSHED
        try:
            os.environ[START_ENV] = "warm" if self.warm else "forked"
            if self.default_threads:
                sys.modules["torch"].set_num_threads(self.default_threads)
            exit_with_parent(os.getppid())  # dies with the executor
            app = self.app if self.app is not None else worker.unloadable(self.app_error)
            code = worker.serve(self.task_client(token), task_id, context, app, report=lambda b: _write_frame(pipe_fd, b))
        except BaseException:  # noqa: BLE001 - a worker reports through its exit code only
            log.exception("ClientApp worker failed")
        return code

    def replace_self(self, token: str, run_id: int) -> None:
        """A task of another run: exec a fresh executor that serves ``token`` first."""
        log.info("task of run %s: replacing the executor bound to run %s with a fresh one", run_id, self.run_id)
        self.client.close()
        argv, skip = [], False
        for arg in sys.argv[1:]:
            if skip or arg == "--token":
                skip = not skip
                continue
            argv.append(arg)
        os.execv(sys.executable, [sys.executable, "-m", __spec__.name, *argv, "--token", token])


def exit_with_parent(parent_pid: int) -> None:
    """Leave (``os._exit``) as soon as ``parent_pid`` is gone. flwr's own monitor raises
    SIGINT instead, which does nothing where SIGINT is ignored (a job a shell started in
    the background inherits that): executors outlived their SuperNodes that way, each
    holding the libraries and the model."""
    direct = os.getppid() == parent_pid  # else: some other process named by --parent-pid

    def alive() -> bool:
        if direct:
            return os.getppid() == parent_pid  # a dead parent's children are handed on
        try:
            os.kill(parent_pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True

    def watch() -> None:
        while alive():
            time.sleep(0.2)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _write_frame(fd: int, payload: bytes) -> None:
    os.write(fd, struct.pack(">I", len(payload)) + payload)


def _read_frames(data: bytes) -> list[bytes]:
    frames, at = [], 0
    while at + 4 <= len(data):
        (n,) = struct.unpack_from(">I", data, at)
        if at + 4 + n > len(data):  # the worker died while writing it
            break
        frames.append(data[at + 4 : at + 4 + n])
        at += 4 + n
    return frames


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per Runtime API request otherwise
    if args.parent_pid is not None:  # first: an executor whose SuperNode is gone exits at once
        exit_with_parent(args.parent_pid)
    started = time.perf_counter()
    threads = warm_libraries()
    log.info("warm executor ready: libraries imported in %.2f s", time.perf_counter() - started)
    Executor(args, threads).loop(args.token)


if __name__ == "__main__":
    main()
