"""Rounds of one transfer each way per node, through Flower's Strategy.start under
Stamen's MeasurementSession (so clients.csv times every downlink and uplink)."""

import json
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from measurements.session import MeasurementSession
from server_app.grid import PolledGrid
from server_app.profiles import wait_for_nodes
from server_app.run_dir import RunDirectory

from .payload import DOWN, UP, decode, encode, intact, load_spec, make

app = ServerApp()


class Transfers(Strategy):
    """Sends each node its downlink arrays; checks each reply's uplink arrays."""

    def __init__(self, spec: dict, packed: bool, nodes: list[int]) -> None:
        self.spec, self.packed, self.nodes = spec, packed, nodes
        self.results: list[dict] = []

    def summary(self) -> None:
        pass

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return [
            Message(
                RecordDict({"arrays": encode(make(self.spec["down"], node, server_round, DOWN), self.packed)}),
                dst_node_id=node,
                message_type=MessageType.TRAIN,
                group_id=str(server_round),
            )
            for node in self.nodes
        ]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        for msg in replies:
            node = msg.metadata.src_node_id
            row = {"round": server_round, "node_id": node, "error": msg.error.reason if msg.has_error() else ""}
            if not msg.has_error():
                up = decode(msg.content.array_records["arrays"], self.packed)
                row.update(
                    up_intact=intact(up, make(self.spec["up"], node, server_round, UP)),
                    down_intact=bool(msg.content.metric_records["metrics"]["down-intact"]),
                    up_arrays=len(up),
                )
            self.results.append(row)
        return None, MetricRecord({"replies": len(self.results)})

    def configure_evaluate(self, server_round, arrays, config, grid):
        return []

    def aggregate_evaluate(self, server_round, replies):
        return None


@app.main()
def main(grid: Grid, context: Context) -> None:
    c = context.run_config
    run = RunDirectory.create(str(c["output.dir"]), context.run_id, dict(c))
    nodes = wait_for_nodes(grid, int(c["min-nodes"]), 120)
    strategy = Transfers(load_spec(str(c["spec-path"])), bool(c["packed"]), nodes)
    grid = PolledGrid(grid, float(c["poll-interval"]))
    with MeasurementSession(run, run_id=context.run_id, collector=str(c["measure.collector"]), enabled=bool(c["measure.enabled"]),
                            certfile=str(c["measure.collector-certfile"]), keyfile=str(c["measure.collector-keyfile"])) as m:
        m.wrap(strategy).start(grid, ArrayRecord(), num_rounds=int(c["num-rounds"]), timeout=float(c["round-timeout"]))
        m.finish(grid, nodes, timeout=120)
    if c["result-path"]:
        with open(str(c["result-path"]), "w") as f:
            json.dump({"run_dir": str(run.path), "results": strategy.results}, f)
