"""Compute emulation: a node trains as fast as this host lets it, then waits out the rest
of the time its device class would need for the same work (docs/scale.md).

A testbed node's CPU quota can only slow it down, and the quotas of a heterogeneous fleet
soon add up to more cores than the host has. With node-config ``emulate-device`` (a
device of the latency model) and ``latency-model`` (the file, on the node), the node
trains without a quota and pads its handler to the model's training time for the round's
work: local steps, the LoRA rank and pruning ratio it was asked for. Transfers stay real
(shaped links). The padding is the handler's ``emulated_wait`` phase, so clients.csv
shows ``clock = emulated``; where the host was slower than the device would be (too
many nodes on too few cores), nothing can be padded, the overrun is recorded as
``emulated_over``, and the row says ``emulated-late``.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from measurements.latency_model import LatencyModel
from measurements.phases import note, phase
from stamen import keys

log = logging.getLogger("stamen.client")


@functools.cache
def _model(path: str) -> LatencyModel:
    return LatencyModel.load(path)


def emulated_train_s(node_config: Mapping, instruction: Mapping, local_steps: int, strategy: str = "") -> float | None:
    """The seconds the node's emulated device needs for this instruction's training, or
    None when the node emulates no device."""
    device = node_config.get(keys.NODE_EMULATE_DEVICE)
    if not device:
        return None
    path = node_config.get(keys.NODE_LATENCY_MODEL)
    if not path:
        raise ValueError(f"node-config {keys.NODE_EMULATE_DEVICE}={device!r} needs {keys.NODE_LATENCY_MODEL}=<a stamen calibrate file>")
    rank = float(instruction.get(keys.LORA_RANK, 0))
    prune = float(instruction.get(keys.PRUNE_RATIO, 0.0))
    return _model(str(path)).device(str(device)).train_s(local_steps, rank, prune, strategy)  # LatencyModelError names the devices it has


@contextmanager
def paced(target_s: float | None) -> Iterator[None]:
    """Run the block, then wait until ``target_s`` seconds have passed since it began."""
    t0 = time.perf_counter()
    yield
    if target_s is None:
        return
    left = target_s - (time.perf_counter() - t0)
    if left >= 0:
        with phase("emulated_wait"):
            time.sleep(left)
    else:
        note("emulated_over", -left)
        log.warning("compute emulation: this host took %.2f s longer than the emulated device would", -left)
