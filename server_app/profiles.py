"""Asking every node for its device profile, and turning profiles into LoRA ranks or early-exit depths."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from logging import ERROR, INFO, WARNING
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from stamen import keys
from stamen.config import ConfigError, EarlyExitConfig, LoraConfig


def wait_for_nodes(grid: Grid, minimum: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < minimum:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(nodes)} of strategy.min-nodes = {minimum} nodes connected after {timeout:.0f} s")
        log(INFO, "waiting for nodes: %d of %d connected", len(nodes), minimum)
        time.sleep(2.0)
    return nodes


def check_partitions(cfg, split, profiles: Mapping[int, Mapping[str, Any]]) -> None:
    """The data partitions the profiled nodes will train on can be built (ml/data.py):
    ConfigError naming the fix otherwise. Logs the partitions' sizes."""
    for count in sorted({int(p[keys.NODE_NUM_PARTITIONS]) for p in profiles.values() if keys.NODE_NUM_PARTITIONS in p}):
        try:
            sizes = split.check_partitions(num_partitions=count, alpha=cfg.data.dirichlet_alpha, seed=cfg.data.seed,
                                           partitioner=cfg.data.partitioner, min_size=cfg.data.min_partition_size)
        except ConfigError as err:
            log(ERROR, "data partitions: %s", err)
            raise
        log(INFO, "data: %d %s partitions of %d to %d examples", count, cfg.data.partitioner, min(sizes), max(sizes))


def query_profiles(
    grid: Grid,
    *,
    min_nodes: int,
    timeout: float,
    on_replies: Callable[[list[Message]], None] | None = None,
    nodes: list[int] | None = None,
) -> tuple[dict[int, dict[str, Any]], dict[int, str]]:
    """Send a ``query`` message to every connected node (or to ``nodes``); ({node id:
    profile}, {node id: why it has none}). A node whose query failed (its node-config is
    invalid: an unknown device class, say) is named in the second; one that did not
    answer in time in neither (it gets the defaults)."""
    nodes = wait_for_nodes(grid, min_nodes, timeout) if nodes is None else list(nodes)
    messages = [
        Message(RecordDict({keys.CONFIG: ConfigRecord()}), dst_node_id=n, message_type=MessageType.QUERY)
        for n in nodes
    ]
    profiles: dict[int, dict[str, Any]] = {}
    failed: dict[int, str] = {}
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    if on_replies is not None:
        on_replies(replies)
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            failed[node] = f"its profile query failed: {reply.error.reason}"
            continue
        profiles[node] = dict(reply.content.config_records[keys.PROFILE])
    for node in set(nodes) - set(profiles) - set(failed):
        log(WARNING, "node %d sent no profile; it gets the default LoRA rank", node)
    return profiles, failed


def ranks_from_profiles(
    profiles: dict[int, dict[str, Any]], lora: LoraConfig, *, max_rank: int | None = None
) -> tuple[dict[int, int], dict[int, str]]:
    """({node: LoRA rank}, {node: why it is left out}). node-config ``lora-rank`` wins; then
    ``lora.rank-by-partition``; then ``lora.rank-by-class``. A rank that is not an integer
    in 1..``max_rank`` (``lora.max-rank``, or the model's smallest adapted dimension if
    that is smaller) leaves the node out, naming the key: one node's config does not stop
    the run."""
    limit = min(lora.max_rank, max_rank) if max_rank is not None else lora.max_rank
    ranks, left_out = {}, {}
    for node, profile in profiles.items():
        override = profile.get(keys.NODE_LORA_RANK)
        if override is not None:
            rank, key = override, f"node-config {keys.NODE_LORA_RANK}"
        else:
            partition = profile.get(keys.NODE_PARTITION_ID)
            key = "lora.rank-by-partition / lora.rank-by-class"
            rank = lora.rank_for(str(profile.get(keys.NODE_DEVICE_CLASS, "cpu")), int(partition) if partition is not None else None)
        if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= limit:
            left_out[node] = f"{key} = {rank!r}: must be an integer in 1..{limit} (lora.max-rank {lora.max_rank}, and the model's dimension)"
            continue
        ranks[node] = rank
    return ranks, left_out


def exits_from_profiles(
    profiles: dict[int, dict[str, Any]], early_exit: EarlyExitConfig, num_exits: int
) -> tuple[dict[int, int], dict[int, str]]:
    """({node: deepest exit it trains}, {node: why it is left out}). node-config
    ``max-exit`` wins; then ``early-exit.exit-by-partition``; then
    ``early-exit.exit-by-class``; else full depth. A max exit outside 1..num_exits leaves
    the node out, naming the key."""
    exits, left_out = {}, {}
    for node, profile in profiles.items():
        override = profile.get(keys.NODE_MAX_EXIT)
        if override is not None:
            if not isinstance(override, int) or isinstance(override, bool) or not 1 <= override <= num_exits:
                left_out[node] = f"node-config {keys.NODE_MAX_EXIT} = {override!r}: must be an integer in 1..{num_exits}"
                continue
            exits[node] = override
        else:
            partition = profile.get(keys.NODE_PARTITION_ID)
            exits[node] = early_exit.exit_for(
                str(profile.get(keys.NODE_DEVICE_CLASS, "cpu")), int(partition) if partition is not None else None, num_exits
            )
    return exits, left_out


def leave_out(strategy, left_out: dict[int, str]) -> None:
    """Never sample these nodes (``SampledStrategy.retired``); log each with its reason."""
    for node, reason in sorted(left_out.items()):
        log(WARNING, "node %d is left out of this run: %s", node, reason)
        strategy.retired[node] = reason
