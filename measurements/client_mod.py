"""The ClientApp side of the instrumentation: a Flower mod around every handler.

``ClientApp(mods=[measurement_mod])``. For a train or evaluate message it times the
handler (``train_s``, with the parts the handler names through ``measurements.phases``:
``load``, ``loop``, ``serialize``), samples the process's resources while it runs, and
records one event per handler plus one per sample. For every reply (a query included)
it attaches the events the telemetry service has not delivered yet, so that they reach
the server in the reply instead (see ``measurements/spool.py``).

Under ``stamen-supernode`` the events go through the node's spool: resource samples
are written as they are taken, so the SuperNode's telemetry sender streams them live.
Under plain ``flower-supernode`` or in Flower's simulation engine there is no spool: the
events of this handler travel in its own reply, and the transfer figures, which only
``stamen-supernode`` measures, are absent.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
import uuid

import psutil
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable

from stamen import keys
from stamen.config import MeasureConfig

from . import events as ev
from .phases import recording
from .resources import ResourceSampler, Sample, gpu_peak_memory_bytes, process_age_s, reset_gpu_peak
from .spool import ENV_VAR, REPLY, Spool

_INLINE_SPOOL = "inline-" + uuid.uuid4().hex[:8]  # events of this process when there is no spool
_inline_seq = itertools.count(1)


def transport() -> str:
    """What moved this message to the node: decides which figures can exist."""
    if os.environ.get(ENV_VAR):
        return "stamen-supernode"
    if "ray" in sys.modules:  # Flower's simulation engine runs ClientApps in Ray actors
        return "simulation"
    return "flower-supernode"


START_ENV = "STAMEN_START"  # set by the warm runtime in its workers (device_runtime/executor.py)
MESSAGE_WAIT_ENV = "STAMEN_MESSAGE_WAIT_S"  # ... with the seconds its worker waited for the message (worker.py)


def start_kind(transport_name: str) -> str:
    """How this process started: ``warm`` (forked from the warm runtime with the run
    preloaded), ``forked`` (forked, the run not preloaded), ``cold`` (a fresh
    flwr-clientapp process) or ``simulation`` (a Ray worker, which outlives messages)."""
    if os.environ.get(START_ENV):
        return os.environ[START_ENV]
    return "simulation" if transport_name == "simulation" else "cold"


def node_rss_bytes() -> float | None:
    """Resident memory of the node's long-lived processes when the message arrived: this
    process's parent (the warm executor, or flower-superexec) and grandparent (the
    SuperNode). What the node holds between rounds; the ClientApp's own is in the samples."""
    try:
        parent = psutil.Process().parent()
        procs = [parent, parent.parent()] if parent is not None else []
        return float(sum(p.memory_info().rss for p in procs if p is not None))
    except psutil.Error:
        return None


def measurement_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    settings = MeasureConfig.from_run_config(context.run_config, lenient=True)
    if not settings.enabled:
        return call_next(msg, context)
    interval = settings.sample_interval
    spool = Spool.from_env()
    auth = msg.content.config_records.get(keys.TELEMETRY_AUTH) if msg.has_content() else None
    if spool is not None and auth is not None and keys.TELEMETRY_KEY in auth:  # the sender signs with it (measurements/auth.py)
        spool.set_key(int(msg.metadata.run_id), str(auth[keys.TELEMETRY_KEY]))
    kind = str(msg.metadata.message_type)
    base = {"node_id": int(context.node_id), "run_id": int(msg.metadata.run_id), "message_id": str(msg.metadata.message_id)}
    labels = {"transport": transport()}
    labels["start"] = start_kind(labels["transport"])
    for key in (keys.NODE_DEVICE_CLASS, keys.NODE_NETWORK):
        if key in context.node_config:
            labels[key] = str(context.node_config[key])
    inline: list[ev.Event] = []

    def keep(event: ev.Event) -> None:
        if spool is not None:
            spool.add(event)
        else:
            event.spool_id, event.seq = _INLINE_SPOOL, next(_inline_seq)
            inline.append(event)

    if kind in ev.HANDLERS:  # timed and sampled
        started_unix = time.time()
        values: dict[str, float] = {}
        if labels["transport"] != "simulation":  # a process per message: its start-up (or fork) is part of the round
            values["app_start_s"] = process_age_s()
            if (waited := os.environ.get(MESSAGE_WAIT_ENV)) is not None:  # the warm runtime's worker
                values["message_wait_s"] = float(waited)
            if (rss := node_rss_bytes()) is not None:
                values["node_rss_bytes"] = rss

        def on_sample(s: Sample) -> None:
            keep(ev.Event(ev.SAMPLE, s.unix_s, values=_sample_values(s), labels=labels, **base))

        reset_gpu_peak()
        t0 = time.perf_counter()
        with recording() as phases, ResourceSampler(interval, on_sample=on_sample) as sampler:
            reply = call_next(msg, context)
        duration = time.perf_counter() - t0
        values.update({f"{name}_s": seconds for name, seconds in phases.durations.items()})
        values.update({f"{name}_cpu_s": seconds for name, seconds in phases.cpu.items()})
        values.update(sampler.summary())
        if (gpu := gpu_peak_memory_bytes()) is not None:
            values["gpu_mem_peak_bytes"] = float(gpu)
        keep(ev.Event(kind, started_unix, duration, values=values, labels=labels, **base))
    else:
        reply = call_next(msg, context)

    if reply.has_error():  # an error reply has no content: the events wait for the next path
        return reply
    pending = spool.claim(REPLY) if spool is not None else inline
    if pending:
        reply.content[keys.TELEMETRY] = ConfigRecord({keys.TELEMETRY_EVENTS: ev.dumps(pending)})
    return reply


def _sample_values(s: Sample) -> dict[str, float]:
    """A Sample's fields carry the event's value names; sensors a machine lacks are left out."""
    return {k: float(v) for k in ev.SAMPLE_VALUES if (v := getattr(s, k)) is not None}
