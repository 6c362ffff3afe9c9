"""The task and this node's data partition, shared by the train handlers (app.py,
early_exit.py); built once per run under the warm runtime (ml/cache.py)."""

from __future__ import annotations

from flwr.app import Context

from ml.cache import cached
from stamen import keys
from stamen.config import StamenConfig


def node_task_and_data(context: Context, cfg: StamenConfig):
    """The task, and this node's partition of the training data (node-config
    ``partition-id`` / ``num-partitions``); also applies node-config ``num-threads``."""
    import torch

    torch.set_num_threads(int(context.node_config.get(keys.NODE_NUM_THREADS, torch.get_num_threads())))
    return task_and_partition(context, cfg)


def loop_seed(cfg: StamenConfig, server_round: int, partition_id: int) -> int:
    """The seed of a round's local training (its data order): another per round and node."""
    return cfg.train.seed + 7919 * server_round + partition_id


def task_and_partition(context: Context, cfg: StamenConfig):
    """Built once per run under the warm runtime (ml/cache.py), else for every message."""
    from ml.tasks import build_task

    node = context.node_config
    task, split = cached(("task", cfg.model, cfg.data), lambda: build_task(cfg))
    partition = (int(node.get(keys.NODE_PARTITION_ID, 0)), int(node.get(keys.NODE_NUM_PARTITIONS, 1)))
    data = cached(
        ("partition", cfg.data, partition),
        lambda: split.partition(partition_id=partition[0], num_partitions=partition[1], alpha=cfg.data.dirichlet_alpha, seed=cfg.data.seed,
                                partitioner=cfg.data.partitioner, min_size=cfg.data.min_partition_size),
    )
    return task, data
