"""A malicious node, for tests only: put this directory on a SuperNode's PYTHONPATH and set
STAMEN_TEST_ATTACK, and every Python process of that node (its ClientApp processes, the
warm runtime's workers) runs Stamen's own ClientApp with its replies altered after they
are built, as a node that sends anything would:

- ``scale=<x>``: every LoRA B factor and the head multiplied by x (a huge norm);
- ``num-examples=<n>``: the reply claims n training examples;
- ``profile``: the device profile claims the same n (a lie the server cannot check);
- ``die-at-round=<r>``: on the train instruction of round r the node crashes, SuperNode
  and all (SIGKILL to its process group, as a power cut), before it replies.

For example ``STAMEN_TEST_ATTACK="scale=1e4,num-examples=1e9,profile"``. Nothing here is
imported by the project; tests/test_attack_e2e.py starts a node with it.
"""

import importlib.abc
import importlib.util
import os
import signal
import sys

ATTACK = dict(
    (item.split("=", 1) + [""])[:2] for item in os.environ.get("STAMEN_TEST_ATTACK", "").split(",") if item
)
TARGETS = {"client_app.methods.lora", "client_app.app"}


def _alter_reply(reply, keys, from_record, to_record):
    if not reply.has_content() or keys.ARRAYS not in reply.content.array_records:
        return reply
    arrays = from_record(reply.content.array_records[keys.ARRAYS])
    scale = float(ATTACK.get("scale", 1.0))
    for name in list(arrays):
        if name.endswith(keys.LORA_B) or name.startswith("head."):
            arrays[name] = (arrays[name] * scale).astype(arrays[name].dtype)
    reply.content[keys.ARRAYS] = to_record(arrays)
    if "num-examples" in ATTACK:
        reply.content.metric_records[keys.METRICS][keys.NUM_EXAMPLES] = int(float(ATTACK["num-examples"]))
    return reply


def _patch(module):
    from stamen import keys
    from stamen.records import from_record, to_record

    if module.__name__ == "client_app.methods.lora":
        run = module.LoRAMethod.run

        def attacked_run(self, msg, context, cfg):
            server_round = int(msg.content.config_records[keys.CONFIG][keys.SERVER_ROUND])
            if "die-at-round" in ATTACK and server_round == int(ATTACK["die-at-round"]):
                os.killpg(os.getpgid(0), signal.SIGKILL)  # the SuperNode is this process group's leader
            return _alter_reply(run(self, msg, context, cfg), keys, from_record, to_record)

        module.LoRAMethod.run = attacked_run
    elif module.__name__ == "client_app.app" and "profile" in ATTACK and "num-examples" in ATTACK:
        task_and_partition = module.task_and_partition

        class Claimed(list):  # what the query handler counts as the partition
            def __len__(self):
                return int(float(ATTACK["num-examples"]))

        module.task_and_partition = lambda context, cfg: (task_and_partition(context, cfg)[0], Claimed())


class _AfterImport(importlib.abc.MetaPathFinder):
    """Alter the target modules right after they are imported."""

    def find_spec(self, name, path, target=None):
        if name not in TARGETS:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


if ATTACK:
    sys.meta_path.insert(0, _AfterImport())
