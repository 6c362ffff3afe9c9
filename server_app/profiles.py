"""Asking every node for its device profile, and turning profiles into LoRA ranks."""

from __future__ import annotations

import time
from logging import INFO, WARNING
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from measurements.aggregation import ingest_replies
from measurements.telemetry import TelemetryStore
from stamen import keys
from stamen.config import LoraConfig


def wait_for_nodes(grid: Grid, minimum: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < minimum:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(nodes)} of strategy.min-nodes = {minimum} nodes connected after {timeout:.0f} s")
        log(INFO, "waiting for nodes: %d of %d connected", len(nodes), minimum)
        time.sleep(2.0)
    return nodes


def query_profiles(
    grid: Grid, *, min_nodes: int, timeout: float, telemetry: TelemetryStore | None = None
) -> dict[int, dict[str, Any]]:
    """Send a ``query`` message to every connected node; {node id: profile}."""
    nodes = wait_for_nodes(grid, min_nodes, timeout)
    messages = [
        Message(RecordDict({keys.CONFIG: ConfigRecord()}), dst_node_id=n, message_type=MessageType.QUERY)
        for n in nodes
    ]
    profiles: dict[int, dict[str, Any]] = {}
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    if telemetry is not None:
        ingest_replies(replies, telemetry)
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            log(WARNING, "node %d did not send a profile: %s", node, reply.error.reason)
            continue
        profiles[node] = dict(reply.content.config_records[keys.PROFILE])
    for node in set(nodes) - set(profiles):
        log(WARNING, "node %d sent no profile; it gets the default LoRA rank", node)
    return profiles


def flush_telemetry(grid: Grid, nodes: list[int], telemetry: TelemetryStore, *, timeout: float) -> int:
    """Ask every node for the events it still holds (the last round's uplinks, or all of
    them when the collector was unreachable). Returns how many came back."""
    messages = [
        Message(RecordDict({keys.CONFIG: ConfigRecord({keys.FLUSH: True})}), dst_node_id=n, message_type=MessageType.QUERY)
        for n in nodes
    ]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    count = ingest_replies(replies, telemetry)
    log(INFO, "telemetry: %d late events from %d of %d nodes", count, len(replies), len(nodes))
    return count


def ranks_from_profiles(profiles: dict[int, dict[str, Any]], lora: LoraConfig) -> dict[int, int]:
    """node-config ``lora-rank`` wins; otherwise ``lora.rank-by-class`` of the device class."""
    ranks = {}
    for node, profile in profiles.items():
        override = profile.get(keys.NODE_LORA_RANK)
        if override is not None:
            if not isinstance(override, int) or override < 1:
                raise ValueError(f"node {node}: node-config lora-rank = {override!r} must be a positive integer")
            ranks[node] = override
        else:
            ranks[node] = lora.rank_for(str(profile.get(keys.NODE_DEVICE_CLASS, "cpu")))
    return ranks
