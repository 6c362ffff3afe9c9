"""Structured pruning (ml/pruning.py): the pruned model equals the masked full model on
the same inputs, it is really smaller, and importance follows the LoRA gradients."""

import copy

import numpy as np
import pytest
import torch

from ml import pruning
from ml.privacy import DPSGD


def _bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=12)
    return BertModel(config, add_pooling_layer=False).eval()


def _llama():
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=24, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=3, intermediate_size=20, head_dim=4)
    return LlamaModel(config).eval()


def _inputs():
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_unit_groups_of_bert_and_llama():
    bert = {g.name: g for g in pruning.unit_groups(_bert())}
    assert bert["encoder.layer.0.attention"].num_units == 4 and bert["encoder.layer.0.mlp"].num_units == 12
    llama = {g.name: g for g in pruning.unit_groups(_llama())}
    attn = llama["layers.0.self_attn"]
    assert attn.num_units == 3 and dict(attn.producers)["layers.0.self_attn.q_proj"] == 8  # 2 query heads of 4 per group
    assert llama["layers.1.mlp"].num_units == 20


@pytest.mark.parametrize("build,keep", [
    (_bert, {"encoder.layer.0.attention": [0, 2], "encoder.layer.1.attention": [3], "encoder.layer.0.mlp": [1, 5, 6, 11]}),
    (_llama, {"layers.0.self_attn": [0, 2], "layers.1.self_attn": [1], "layers.1.mlp": list(range(0, 20, 3))}),
])
def test_the_pruned_model_equals_the_masked_full_model(build, keep):
    full = build()
    masked, pruned = copy.deepcopy(full), copy.deepcopy(full)
    pruning.mask(masked, keep)
    pruning.prune(pruned, keep)
    with torch.no_grad():
        a = masked(**_inputs()).last_hidden_state
        b = pruned(**_inputs()).last_hidden_state
        c = full(**_inputs()).last_hidden_state
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a, c)  # pruning changed something
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(pruned) < n(full)


def test_pruning_a_lora_model_slices_the_adapter_too():
    from peft import LoraConfig, inject_adapter_in_model

    model = _bert()
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["query", "value", "dense"], lora_dropout=0.0), model)
    q = model.encoder.layer[0].attention.self.query
    o = model.encoder.layer[0].attention.output.dense
    mlp_out = model.encoder.layer[0].output.dense
    with torch.no_grad():  # every row of B / column of A says where it came from
        q.lora_B["default"].weight.copy_(torch.arange(16.0)[:, None].repeat(1, 2))
        o.lora_A["default"].weight.copy_(torch.arange(16.0)[None, :].repeat(2, 1))
        mlp_out.lora_A["default"].weight.copy_(torch.arange(12.0)[None, :].repeat(2, 1))
    pruning.prune(model, {"encoder.layer.0.attention": [1, 2], "encoder.layer.0.mlp": [0, 3, 4]})
    assert q.lora_B["default"].weight.shape == (8, 2) and q.base_layer.weight.shape == (8, 16)
    assert o.lora_A["default"].weight.shape == (2, 8) and o.base_layer.weight.shape == (16, 8)
    assert mlp_out.lora_A["default"].weight.shape == (2, 3)
    # the kept ones are those of heads 1 and 2 (head size 4: rows / columns 4..11) and of channels 0, 3, 4
    assert q.lora_B["default"].weight[:, 0].tolist() == list(range(4, 12))
    assert o.lora_A["default"].weight[0].tolist() == list(range(4, 12))
    assert mlp_out.lora_A["default"].weight[0].tolist() == [0.0, 3.0, 4.0]
    with torch.no_grad():
        assert torch.isfinite(model(**_inputs()).last_hidden_state).all()


def test_importance_follows_the_lora_gradient_and_picks_the_kept_units():
    from peft import LoraConfig, inject_adapter_in_model

    model = _bert()
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["query", "value"], lora_dropout=0.0), model)
    imp = pruning.UnitImportance(model, smoothing=0.5)
    q = model.encoder.layer[0].attention.self.query.lora_B["default"].weight
    for step in range(2):
        model.zero_grad()
        q.grad = torch.zeros_like(q)
        q.grad[4:8] = 1.0 + step  # head 1's rows of the query adapter (head size 4)
        imp.update()
    scores = imp.scores["encoder.layer.0.attention"]
    # 4 rows x rank 2 entries: 8 * 1^2, then 8 * 2^2; EMA with 0.5
    assert scores.argmax() == 1 and scores[1] == pytest.approx(0.5 * 8 + 0.5 * 32)
    assert np.count_nonzero(scores) == 1
    assert pruning.keep_most_important({"g": np.array([0.1, 3.0, 2.0, 0.5])}, 0.5) == {"g": [1, 2]}
    assert pruning.keep_most_important({"g": np.array([1.0, 2.0])}, 0.9) == {"g": [1]}  # at least one
    with pytest.raises(ValueError):
        pruning.keep_most_important({"g": np.ones(2)}, 1.0)


class _Task:
    @staticmethod
    def batch(data, index):
        ids = torch.as_tensor(np.stack([data.texts[i] for i in index]))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.as_tensor(data.labels[index])}

    @staticmethod
    def loss(model, batch):
        labels = batch.pop("labels")
        return torch.nn.functional.cross_entropy(model(**batch).last_hidden_state.mean(1)[:, :2], labels)


def _lora_bert_and_data():
    from peft import LoraConfig, inject_adapter_in_model

    from ml.data import TextDataset

    rng = np.random.default_rng(0)
    data = TextDataset(tuple(rng.integers(0, 50, 7) for _ in range(32)), rng.integers(0, 2, 32), ("a", "b"))
    model = _bert()
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["query", "value"], lora_dropout=0.0), model)
    for n, p in model.named_parameters():
        p.requires_grad = "lora_" in n
    return model, data


def test_train_pruned_reaches_the_ratio_gradually_and_reports_kept_units():
    from peft import LoraConfig, inject_adapter_in_model

    model, data = _lora_bert_and_data()
    out = pruning.train_pruned(model, _Task, data, ratio=0.5, steps=8, seed=0, batch_size=4, learning_rate=1e-3, head_learning_rate=1e-3)
    assert {k: len(v) for k, v in out["kept"].items()} == {
        "encoder.layer.0.attention": 2, "encoder.layer.1.attention": 2, "encoder.layer.0.mlp": 6, "encoder.layer.1.mlp": 6}
    assert model.encoder.layer[0].attention.self.query.base_layer.weight.shape == (8, 16)
    assert all(len(s) == n for s, n in zip(out["scores"].values(), (4, 12, 4, 12), strict=True))
    assert np.isfinite([out["loss"], out["loss_start"], out["loss_end"]]).all()
    # the kept rows of a producer, in unpruned coordinates, follow the kept heads
    groups = pruning.unit_groups(_bert())
    rows, cols = pruning.module_indices(groups, out["kept"])["encoder.layer.0.attention.self.query"]
    heads = out["kept"]["encoder.layer.0.attention"]
    assert cols is None and list(rows) == [h * 4 + i for h in heads for i in range(4)]
    # a second round with the scores prunes at once
    model2 = _bert()
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["query", "value"], lora_dropout=0.0), model2)
    out2 = pruning.train_pruned(model2, _Task, data, ratio=0.5, steps=4, seed=1, scores=out["scores"], batch_size=4,
                                learning_rate=1e-3, head_learning_rate=1e-3)
    assert {k: len(v) for k, v in out2["kept"].items()} == {k: len(v) for k, v in out["kept"].items()}


def test_train_pruned_prunes_to_half_the_ratio_then_the_ratio_keeping_the_top_scored_units(monkeypatch):
    """Scores that rise with a unit's position: the top-scored are the last ones. Ratio 0.5
    of 4 heads: first keep 3 (ratio 0.25: heads 1-3), then 2 of those (heads 2, 3)."""

    class RisingScores:
        def __init__(self, model, smoothing):
            self.scores = {g.name: np.arange(g.num_units, dtype=np.float64) for g in pruning.unit_groups(model)}

        def update(self, *args):
            pass

    calls = []
    real_prune = pruning.prune
    monkeypatch.setattr(pruning, "UnitImportance", RisingScores)
    monkeypatch.setattr(pruning, "prune", lambda model, keep: (calls.append({k: list(v) for k, v in keep.items()}), real_prune(model, keep)))
    model, data = _lora_bert_and_data()
    out = pruning.train_pruned(model, _Task, data, ratio=0.5, steps=8, seed=0, batch_size=4, learning_rate=1e-3, head_learning_rate=1e-3)
    heads = "encoder.layer.0.attention"
    assert [len(c[heads]) for c in calls] == [3, 2]  # the intermediate ratio, then the ratio
    assert calls[0][heads] == [1, 2, 3] and list(out["kept"][heads]) == [2, 3]
    assert list(out["kept"]["encoder.layer.0.mlp"]) == list(range(6, 12))  # 12 channels: keep 9 (3..11), then 6


def test_the_reward_losses_are_the_model_as_received_and_as_sent_on_the_same_batches():
    """loss_reference is the unpruned, untrained model's loss on the first batch: the
    same whatever the ratio, so pruning damage cannot inflate it (a node with scores
    prunes before its first step). loss_after is the trained, pruned model's."""
    import copy
    import itertools

    from ml.data import batch_indices

    model, data = _lora_bert_and_data()
    scores = {g.name: np.arange(g.num_units, dtype=np.float64) for g in pruning.unit_groups(model)}  # known: prune at once
    probe = list(itertools.islice(batch_indices(len(data), 4, seed=3), pruning.PROBE_BATCHES))
    reference = pruning.probe_loss(copy.deepcopy(model), _Task, data, probe)
    for ratio in (0.0, 0.75):
        m = copy.deepcopy(model)
        out = pruning.train_pruned(m, _Task, data, ratio=ratio, steps=8, seed=3, scores=scores, batch_size=4,
                                   learning_rate=1e-2, head_learning_rate=1e-2)
        assert out["loss_reference"] == pytest.approx(reference, rel=1e-6), ratio
        assert out["loss_after"] == pytest.approx(pruning.probe_loss(m, _Task, data, probe), rel=1e-6)
        assert out["loss_after"] != pytest.approx(reference)  # it trained (and, at 0.75, was pruned)


@pytest.mark.parametrize("steps", [1, 2, 3, 8])
def test_train_pruned_takes_exactly_the_steps_it_was_given(steps):
    """The DP budget plans for train.local-steps steps: pruning's phases must add up to them."""
    model, data = _lora_bert_and_data()
    out = pruning.train_pruned(model, _Task, data, ratio=0.5, steps=steps, seed=0, batch_size=4, learning_rate=1e-3,
                               head_learning_rate=1e-3, private=DPSGD(1.0, 1.0))
    assert out["ledger"].steps == steps
    assert len(out["kept"]["encoder.layer.0.attention"]) == 2  # and it still reaches the ratio
