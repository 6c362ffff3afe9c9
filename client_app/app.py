"""The ClientApp: ``query`` answers with the device profile; ``train`` runs the device-side
method the instruction names (client_app/methods/: a LoRA of the node's rank on the
global model, or an early-exit sub-model) and replies with what it trained."""

from __future__ import annotations

import logging

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from measurements.client_mod import measurement_mod
from ml.cache import cached
from stamen import keys
from stamen.config import EARLY_EXIT_STRATEGIES, ConfigError, StamenConfig

from .device import detect_profile
from .methods import method_for
from .pace import emulated_train_s, paced
from .sync import keeps_global
from .task import task_and_partition

log = logging.getLogger("stamen.client")
app = ClientApp(mods=[measurement_mod])  # phase timings and resource samples: measurements/


@app.query()
def query(msg: Message, context: Context) -> Message:
    if msg.content.config_records.get(keys.CONFIG, {}).get(keys.FLUSH):
        return Message(RecordDict(), reply_to=msg)  # the mod attaches the events this node still holds
    profile = detect_profile(dict(context.node_config))
    cfg = StamenConfig.from_run_config(context.run_config)
    profile[keys.KEEPS_GLOBAL] = keeps_global(profile["transport"], cfg.simulation.keep_global)
    try:
        _, data = task_and_partition(context, cfg)
        profile[keys.NUM_EXAMPLES] = len(data)  # the server caps this node's aggregation weight by it (strategies/bounds.py)
    except ConfigError as err:  # a partitioning that cannot be built: the server says so once, before round 1
        log.warning("no data partition: %s", err)
    return Message(RecordDict({keys.PROFILE: ConfigRecord(profile)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Serve a train instruction with the device-side method it names (client_app/methods/)."""
    cfg = StamenConfig.from_run_config(context.run_config)
    instruction = msg.content.config_records[keys.CONFIG]
    # compute emulation: padded to the emulated device's time for this work (client_app/pace.py)
    with paced(emulated_train_s(context.node_config, instruction, cfg.train.local_steps, cfg.strategy.name)):
        return method_for(instruction).run(msg, context, cfg)


def preload(context: Context) -> None:
    """The warm runtime's hook (device_runtime/executor.py): load, once per run and before
    the next message arrives, what every message of this run builds the same way: the
    libraries, the task and data split, this node's partition and the base model.

    Runs in the executor, whose memory the workers share copy-on-write, so nothing here
    may start threads or touch CUDA (the model stays on the CPU; each message moves its
    own copy to the device)."""
    cfg = StamenConfig.from_run_config(context.run_config)
    task, _ = task_and_partition(context, cfg)
    if cfg.strategy.name not in EARLY_EXIT_STRATEGIES:  # they build their model from the backbone
        cached(("model", cfg.model, cfg.data), task.load_model, once=True)
