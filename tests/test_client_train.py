"""The ClientApp's train handler, called directly on a tiny model, with the FLoRA strategy
on the other side (no processes): two rounds, dense then stacked downlink."""

import numpy as np
from flwr.app import ConfigRecord, Context, RecordDict

from client_app.app import train
from ml.model import adapted_weights, head_state, load_model, target_module_names
from stamen import keys
from strategies.flora import FLoRA
from strategies.lora_records import from_record, join_global, split_global, to_record


def test_two_rounds_through_the_train_handler(flower_identity, fake_grid, tiny_bert, run_config):
    run_config.update(
        {"model.path": str(tiny_bert), "train.local-steps": 2, "train.batch-size": 4, "model.max-seq-len": 32}
    )
    server_model = load_model("text-classification", str(tiny_bert), num_labels=5)
    targets = target_module_names(server_model)
    assert len(targets) == 4  # query and value of 2 layers
    initial = join_global(adapted_weights(server_model, targets), head_state(server_model))

    strategy = FLoRA(node_ranks={7: 4, 8: 2}, default_rank=8, lora_alpha=16.0, min_nodes=1)
    contexts = {
        n: Context(run_id=1, node_id=n, node_config={"partition-id": i, "num-partitions": 2}, state=RecordDict(), run_config=run_config)
        for i, n in enumerate((7, 8))
    }

    msgs = list(strategy.configure_train(1, to_record(initial), ConfigRecord(), fake_grid([7, 8])))
    replies = [train(m, contexts[m.metadata.dst_node_id]) for m in msgs]
    for reply in replies:
        assert not reply.has_error()
        metrics = reply.content.metric_records[keys.METRICS]
        arrays = from_record(reply.content.array_records[keys.ARRAYS])
        rank = metrics[keys.LORA_RANK]
        assert arrays[targets[0] + keys.LORA_A].shape == (rank, 32)
        assert arrays[targets[0] + keys.LORA_B].shape == (32, rank)
        assert np.abs(arrays[targets[0] + keys.LORA_B]).max() > 0  # B starts at zero: it trained
        assert metrics[keys.NUM_EXAMPLES] > 0 and np.isfinite(metrics[keys.TRAIN_LOSS])

    new, metrics = strategy.aggregate_train(1, replies)
    assert metrics["num-clients"] == 2 and metrics["global-rank"] == 6 and metrics["dropped"] == 0
    new_weights, _ = split_global(from_record(new))
    old_weights, _ = split_global(initial)
    assert all(not np.allclose(new_weights[m], old_weights[m]) for m in targets)

    # Round 2: both nodes hold version 0 and receive the stacked adapter; after applying
    # it, their copy equals the server's merged weights.
    msgs2 = list(strategy.configure_train(2, new, ConfigRecord(), fake_grid([7, 8])))
    assert {m.content.config_records[keys.CONFIG][keys.SYNC_MODE] for m in msgs2} == {keys.SYNC_STACKED}
    replies2 = [train(m, contexts[m.metadata.dst_node_id]) for m in msgs2]
    assert not any(r.has_error() for r in replies2)
    for ctx in contexts.values():
        held = from_record(ctx.state.array_records[keys.STATE_GLOBAL])
        assert ctx.state.config_records[keys.STATE_META]["version"] == 1
        for m in targets:
            np.testing.assert_allclose(held[m], new_weights[m], rtol=1e-6, atol=1e-7)
