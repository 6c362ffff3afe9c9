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
from .resources import ResourceSampler, Sample, gpu_peak_memory_bytes, reset_gpu_peak
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


def measurement_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    settings = MeasureConfig.from_run_config(context.run_config, lenient=True)
    if not settings.enabled:
        return call_next(msg, context)
    interval = settings.sample_interval
    spool = Spool.from_env()
    kind = str(msg.metadata.message_type)
    base = dict(node_id=int(context.node_id), run_id=int(msg.metadata.run_id), message_id=str(msg.metadata.message_id))
    labels = {"transport": transport()}
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
        if labels["transport"] != "simulation":  # a fresh process per message: its start-up is Flower's
            values["app_start_s"] = max(0.0, started_unix - psutil.Process().create_time())

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
