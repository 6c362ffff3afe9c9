"""Asking every node for its device profile, and turning profiles into LoRA ranks or early-exit depths."""

from __future__ import annotations

import time
from collections.abc import Callable
from logging import INFO, WARNING
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from stamen import keys
from stamen.config import EarlyExitConfig, LoraConfig


def wait_for_nodes(grid: Grid, minimum: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < minimum:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(nodes)} of strategy.min-nodes = {minimum} nodes connected after {timeout:.0f} s")
        log(INFO, "waiting for nodes: %d of %d connected", len(nodes), minimum)
        time.sleep(2.0)
    return nodes


def query_profiles(
    grid: Grid, *, min_nodes: int, timeout: float, on_replies: Callable[[list[Message]], None] | None = None
) -> dict[int, dict[str, Any]]:
    """Send a ``query`` message to every connected node; {node id: profile}."""
    nodes = wait_for_nodes(grid, min_nodes, timeout)
    messages = [
        Message(RecordDict({keys.CONFIG: ConfigRecord()}), dst_node_id=n, message_type=MessageType.QUERY)
        for n in nodes
    ]
    profiles: dict[int, dict[str, Any]] = {}
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    if on_replies is not None:
        on_replies(replies)
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            log(WARNING, "node %d did not send a profile: %s", node, reply.error.reason)
            continue
        profiles[node] = dict(reply.content.config_records[keys.PROFILE])
    for node in set(nodes) - set(profiles):
        log(WARNING, "node %d sent no profile; it gets the default LoRA rank", node)
    return profiles


def ranks_from_profiles(profiles: dict[int, dict[str, Any]], lora: LoraConfig) -> dict[int, int]:
    """node-config ``lora-rank`` wins; then ``lora.rank-by-partition``; then ``lora.rank-by-class``."""
    ranks = {}
    for node, profile in profiles.items():
        override = profile.get(keys.NODE_LORA_RANK)
        if override is not None:
            if not isinstance(override, int) or override < 1:
                raise ValueError(f"node {node}: node-config lora-rank = {override!r} must be a positive integer")
            ranks[node] = override
        else:
            partition = profile.get(keys.NODE_PARTITION_ID)
            ranks[node] = lora.rank_for(
                str(profile.get(keys.NODE_DEVICE_CLASS, "cpu")), int(partition) if partition is not None else None
            )
    return ranks


def exits_from_profiles(profiles: dict[int, dict[str, Any]], early_exit: EarlyExitConfig, num_exits: int) -> dict[int, int]:
    """The deepest exit each node trains: node-config ``max-exit`` wins; then
    ``early-exit.exit-by-partition``; then ``early-exit.exit-by-class``; else full depth."""
    exits = {}
    for node, profile in profiles.items():
        override = profile.get(keys.NODE_MAX_EXIT)
        if override is not None:
            if not isinstance(override, int) or not 1 <= override <= num_exits:
                raise ValueError(f"node {node}: node-config max-exit = {override!r} must be an integer in 1..{num_exits}")
            exits[node] = override
        else:
            partition = profile.get(keys.NODE_PARTITION_ID)
            exits[node] = early_exit.exit_for(
                str(profile.get(keys.NODE_DEVICE_CLASS, "cpu")), int(partition) if partition is not None else None, num_exits
            )
    return exits
