"""Replies with ``up-bytes`` of arrays after ``work-iterations`` of pure-Python work."""

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from measurements.client_mod import measurement_mod
from measurements.phases import phase

app = ClientApp(mods=[measurement_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    c = context.run_config
    with phase("loop"):
        total = 0
        for i in range(int(c["work-iterations"])):
            total += i * i % 7
    with phase("serialize"):
        # Distinct bytes per node: Flower's object store is content-addressed, so a second
        # node pushing identical bytes would skip the upload (the SuperLink has them).
        seed = [context.node_id % 2**32, int(msg.metadata.group_id or 0)]
        up = np.random.default_rng(seed).integers(0, 255, int(c["up-bytes"]), dtype=np.uint8)
        arrays = ArrayRecord([up])
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 1, "work": total})}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    return Message(RecordDict(), reply_to=msg)
