"""Flower's FedAvg on payloads of a known size, measured by Stamen's MeasurementSession."""

import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from measurements.session import MeasurementSession
from server_app.profiles import wait_for_nodes
from server_app.run_dir import RunDirectory

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    c = context.run_config
    run = RunDirectory.create(str(c["output.dir"]), context.run_id, dict(c))
    nodes = wait_for_nodes(grid, int(c["min-nodes"]), 120)
    payload = np.random.default_rng(0).integers(0, 255, int(c["down-bytes"]), dtype=np.uint8)
    fedavg = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=int(c["min-nodes"]), min_available_nodes=int(c["min-nodes"]))
    with MeasurementSession(run, run_id=context.run_id, collector=str(c["measure.collector"]), enabled=bool(c["measure.enabled"]),
                            certfile=str(c["measure.collector-certfile"]), keyfile=str(c["measure.collector-keyfile"])) as m:
        m.wrap(fedavg).start(grid, ArrayRecord([payload]), num_rounds=int(c["num-rounds"]), timeout=float(c["round-timeout"]))
        m.finish(grid, nodes, timeout=120)
