"""Rounds of one empty train message per node, with Flower's own Grid.send_and_receive
(its 3 s poll); writes each round's time and each reply's end-to-end time as JSON."""

import json
import time

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    while len(nodes := list(grid.get_node_ids())) < int(cfg["min-nodes"]):
        time.sleep(1.0)
    rounds = []
    for rnd in range(1, int(cfg["num-rounds"]) + 1):
        messages = [
            Message(RecordDict({"config": ConfigRecord({"round": rnd})}), dst_node_id=n, message_type=MessageType.TRAIN, group_id=str(rnd))
            for n in nodes
        ]
        start = time.perf_counter()
        replies = list(grid.send_and_receive(messages, timeout=120))
        rounds.append({"round": rnd, "round_s": time.perf_counter() - start, "replies": len(replies)})
    if cfg["result-path"]:
        with open(str(cfg["result-path"]), "w") as f:
            json.dump(rounds, f)
