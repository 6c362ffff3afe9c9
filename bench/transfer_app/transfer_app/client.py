"""Checks the downlink against what the server made, answers with the uplink arrays."""

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from measurements.client_mod import measurement_mod
from measurements.phases import phase

from .payload import DOWN, UP, decode, encode, intact, load_spec, make

app = ClientApp(mods=[measurement_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    c = context.run_config
    packed, spec = bool(c["packed"]), load_spec(str(c["spec-path"]))
    server_round = int(msg.metadata.group_id)
    with phase("load"):
        down = decode(msg.content.array_records["arrays"], packed)
        down_ok = intact(down, make(spec["down"], context.node_id, server_round, DOWN))
    with phase("serialize"):
        up = encode(make(spec["up"], context.node_id, server_round, UP), packed)
    metrics = MetricRecord({"num-examples": 1, "down-intact": int(down_ok)})
    return Message(RecordDict({"arrays": up, "metrics": metrics}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """The server's last message asks for the events the node still holds (the mod adds them)."""
    return Message(RecordDict(), reply_to=msg)
