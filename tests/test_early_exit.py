"""Early exits (ml/early_exit.py, strategies/early_exit.py): the aggregation rule on tiny
arrays, the losses, the inference decision, and the model's depth behaviour on a tiny
BERT and a tiny ViT built from configs."""

import math

import numpy as np
import pytest
import torch

from ml import early_exit as ee
from strategies.early_exit import check_update, layerwise_average
from strategies.lora_records import InvalidUpdate

# --- layer-wise averaging ------------------------------------------------------------------


def test_layerwise_average_by_hand():
    g = {"emb": np.array([0.0, 0.0]), "block0": np.array([1.0]), "block1": np.array([5.0]), "head": np.array([9.0])}
    shallow = {"emb": np.array([2.0, 4.0]), "block0": np.array([3.0]), "head": np.array([1.0])}
    deep = {"emb": np.array([8.0, 0.0]), "block0": np.array([6.0]), "block1": np.array([7.0]), "head": np.array([4.0])}
    out = layerwise_average(g, [(1.0, shallow), (3.0, deep)])
    np.testing.assert_allclose(out["emb"], [(2 + 3 * 8) / 4, (4 + 0) / 4])  # everyone: weighted 1:3
    np.testing.assert_allclose(out["block0"], [(3 + 3 * 6) / 4])
    np.testing.assert_allclose(out["block1"], [7.0])  # only the deep node holds it: its value
    np.testing.assert_allclose(out["head"], [(1 + 3 * 4) / 4])


def test_a_parameter_nobody_trained_keeps_its_value_and_dtype():
    g = {"a": np.array([1.5], dtype=np.float32), "b": np.array([2.0], dtype=np.float32)}
    out = layerwise_average(g, [(2.0, {"a": np.array([3.5], dtype=np.float32)})])
    assert out["b"] is g["b"] and out["a"].dtype == np.float32 and out["a"][0] == 3.5


def test_check_update_wants_exactly_what_was_sent():
    sent = {"a": (2,), "b": (1,)}
    check_update({"a": np.zeros(2), "b": np.zeros(1)}, sent)
    with pytest.raises(InvalidUpdate, match="missing"):
        check_update({"a": np.zeros(2)}, sent)
    with pytest.raises(InvalidUpdate, match="shape"):
        check_update({"a": np.zeros(3), "b": np.zeros(1)}, sent)
    with pytest.raises(InvalidUpdate, match="NaN"):
        check_update({"a": np.array([0.0, np.nan]), "b": np.zeros(1)}, sent)


# --- which depth holds what ------------------------------------------------------------------


def test_exit_blocks_spread_evenly_and_validate():
    assert ee.exit_blocks_for(6) == (2, 3, 5, 6)
    assert ee.exit_blocks_for(8) == (2, 4, 6, 8)
    assert ee.exit_blocks_for(6, (1, 6)) == (1, 6)
    with pytest.raises(ValueError):
        ee.exit_blocks_for(6, (3, 2))
    with pytest.raises(ValueError):
        ee.exit_blocks_for(6, (2, 7))


def test_required_exit_of_parameter_names():
    exits = (2, 4, 6)
    assert ee.required_exit("backbone.encoder.layer.0.attention.self.query.weight", exits) == 1
    assert ee.required_exit("backbone.encoder.layer.1.output.dense.bias", exits) == 1
    assert ee.required_exit("backbone.encoder.layer.2.output.dense.bias", exits) == 2
    assert ee.required_exit("backbone.layers.5.attention.q_proj.weight", exits) == 3  # ViT naming
    assert ee.required_exit("heads.1.linear.weight", exits) == 2
    assert ee.required_exit("ree.tokens.meta", exits) == ee.required_exit("backbone.embeddings.cls_token", exits) == 1


# --- losses and the inference rule -------------------------------------------------------------


def test_distillation_is_zero_for_equal_logits_and_positive_otherwise():
    z = torch.tensor([[1.0, 2.0, 0.5]])
    assert ee.distillation(z, z.clone()).item() == pytest.approx(0.0, abs=1e-7)
    # KL(p || q) by hand: p = softmax(teacher), q = softmax(student)
    s, t = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])  # p = (3/4, 1/4), q = (1/2, 1/2)
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert ee.distillation(s, t).item() == pytest.approx(expected, rel=1e-5)


def test_self_distillation_leaves_the_teacher_alone():
    teacher = torch.tensor([[2.0, 0.0]], requires_grad=True)
    student = torch.tensor([[0.0, 1.0]], requires_grad=True)
    ee.self_distillation_loss([student, teacher], teacher=1).backward()
    assert teacher.grad is None or torch.all(teacher.grad == 0)
    assert student.grad is not None and torch.any(student.grad != 0)


def objective(name):
    """The local loss of a device-side method (client_app/methods/<name>.py)."""
    from client_app.methods import METHODS

    return METHODS[name]().loss


def test_each_early_exit_method_has_its_objective():
    labels = torch.tensor([0])
    logits = [torch.tensor([[0.0, 1.0]]), torch.tensor([[2.0, 0.0]])]
    ce = [torch.nn.functional.cross_entropy(z, labels).item() for z in logits]
    same = {"teacher": 1, "distill_weight": 0.5, "temperature": 1.0}
    assert objective("exclusivefl")(logits, labels, **same)[0].item() == pytest.approx(sum(ce))
    assert objective("inclusivefl")(logits, labels, **same)[0].item() == pytest.approx(ce[1])
    kd = ee.distillation(logits[0], logits[1]).item()
    loss, per_exit = objective("reefl")(logits, labels, **same)
    assert loss.item() == pytest.approx(sum(ce) + 0.5 * kd, rel=1e-5)
    assert per_exit.tolist() == pytest.approx(ce)
    mutual = (ee.distillation(logits[0], logits[1]) + ee.distillation(logits[1], logits[0])).item()
    assert objective("depthfl")(logits, labels, **{**same, "distill_weight": 1.0})[0].item() == pytest.approx(sum(ce) + mutual, rel=1e-5)


def test_loss_ema():
    assert ee.update_loss_ema([], [2.0, 4.0], 0.9) == [2.0, 4.0]  # first sight: the loss itself
    assert ee.update_loss_ema([2.0, 4.0], [1.0, 0.0], 0.5) == [1.5, 2.0]


def test_exit_metrics_and_early_exit_decisions_by_hand():
    # 2 exits, 3 examples, 2 classes; labels 0, 1, 1
    probs = np.array(
        [
            [[0.9, 0.1], [0.6, 0.4], [0.55, 0.45]],  # exit 1: right, wrong, wrong
            [[0.3, 0.7], [0.2, 0.8], [0.1, 0.9]],  # exit 2: wrong, right, right
        ]
    )
    labels = np.array([0, 1, 1])
    m = ee.exit_metrics(probs, labels)
    assert m["accuracy_exit1"] == pytest.approx(1 / 3) and m["accuracy_exit2"] == pytest.approx(2 / 3)
    assert m["accuracy_mean"] == pytest.approx(0.5)
    assert m["accuracy_ensemble"] == pytest.approx(1.0)  # means: (0.6,0.4) (0.4,0.6) (0.325,0.675)
    # threshold 0.85: only example 0 is confident at exit 1 (block 2); the rest go to block 6
    acc, blocks = ee.early_exit_decisions(probs, labels, (2, 6), 0.85)
    assert acc == pytest.approx(1.0) and blocks == pytest.approx((2 + 6 + 6) / 3)
    # threshold 0.5: everyone leaves at exit 1
    acc, blocks = ee.early_exit_decisions(probs, labels, (2, 6), 0.5)
    assert acc == pytest.approx(1 / 3) and blocks == pytest.approx(2.0)


# --- the model ----------------------------------------------------------------------------------


def _tiny_bert(layers=4):
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=32)
    return BertModel(config, add_pooling_layer=False)


def _tiny_vit(layers=4):
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=32)
    return ViTModel(config, add_pooling_layer=False)


def _text_batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (3, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("kind", ["ree", "per-exit"])
def test_a_truncated_model_gives_the_full_models_shallow_exits(kind):
    """Exit j depends only on blocks up to it: a shallow device computes the same logits
    as the full model there (so early-exit decisions from one full pass are honest)."""
    torch.manual_seed(0)
    full = ee.EarlyExitClassifier(_tiny_bert(), 3, exit_blocks=(1, 2, 4), exit_kind=kind).eval()
    shallow = ee.EarlyExitClassifier(_tiny_bert(), 3, exit_blocks=(1, 2, 4), exit_kind=kind).eval()
    shallow.load_state_dict(full.state_dict())
    shallow.truncate(2)
    assert len(shallow.backbone.encoder.layer) == 2 and shallow.blocks_run == 2
    with torch.no_grad():
        a, b = full(**_text_batch()), shallow(**_text_batch())
    assert len(a) == 3 and len(b) == 2
    for x, y in zip(a[:2], b, strict=True):
        torch.testing.assert_close(x, y)
    assert set(shallow.required_exits()) == {n for n, e in full.required_exits().items() if e <= 2}


def test_a_shallow_model_runs_fewer_blocks():
    calls = []
    model = ee.EarlyExitClassifier(_tiny_vit(4), 10, exit_blocks=(1, 2, 3, 4), exit_kind="ree", max_exit=2)
    for layer in model.backbone.layers:
        layer.register_forward_hook(lambda *_: calls.append(1))
    model(pixel_values=torch.zeros(2, 1, 8, 8))
    assert len(calls) == 2


def test_modulation_feeds_the_ree_output_to_the_next_block():
    torch.manual_seed(0)
    on = ee.EarlyExitClassifier(_tiny_vit(), 10, exit_blocks=(2, 4), exit_kind="ree").eval()
    off = ee.EarlyExitClassifier(_tiny_vit(), 10, exit_blocks=(2, 4), exit_kind="ree", modulation=False).eval()
    off.load_state_dict(on.state_dict())
    x = torch.randn(2, 1, 8, 8)
    assert torch.all(on.ree.gate.scale == 1.0)  # CLS features: ReeFL's replacement from the start
    with torch.no_grad():
        a, b = on(pixel_values=x), off(pixel_values=x)
    # exit 1 (block 2) already sees block 2 fed with the module's output of block 1
    assert not torch.allclose(a[0], b[0]) and not torch.allclose(a[1], b[1])
    seen = {}
    on.backbone.layers[1].register_forward_pre_hook(lambda m, args: seen.update(cls=args[0][:, 0].clone()))
    with torch.no_grad():
        on(pixel_values=x)
        h1 = on.backbone.layers[0](on.backbone.embeddings(x))
        expected = on.ree(h1[:, :1])[:, 1]  # over [meta; CLS of block 1]: block 1's position
    torch.testing.assert_close(seen["cls"], expected)


def test_with_mean_pooled_features_modulation_starts_closed():
    """Text encoders trained with mean pooling: the gate starts at 0, so the pretrained
    blocks first run exactly as without modulation."""
    torch.manual_seed(0)
    on = ee.EarlyExitClassifier(_tiny_bert(), 3, exit_blocks=(2, 4), exit_kind="ree", pooling="mean").eval()
    off = ee.EarlyExitClassifier(_tiny_bert(), 3, exit_blocks=(2, 4), exit_kind="ree", pooling="mean", modulation=False).eval()
    off.load_state_dict(on.state_dict())
    with torch.no_grad():
        for a, b in zip(on(**_text_batch()), off(**_text_batch()), strict=True):
            torch.testing.assert_close(a, b)
        on.ree.gate.scale.fill_(0.5)
        assert not torch.allclose(on(**_text_batch())[1], off(**_text_batch())[1])


def test_tuning_modes_choose_what_trains():
    def trainable(tuning):
        torch.manual_seed(0)
        m = ee.EarlyExitClassifier(_tiny_bert(2), 3, exit_blocks=(1, 2), exit_kind="ree")
        ee.set_tuning(m, tuning, lora_rank=2)
        return {n for n, p in m.named_parameters() if p.requires_grad}

    frozen, lora, full = trainable("frozen"), trainable("lora"), trainable("full")
    assert frozen and all(n.startswith(("ree.", "head.")) for n in frozen)
    assert lora - frozen and all("lora_" in n for n in lora - frozen)
    assert any(n.startswith("backbone.embeddings.") for n in full) and not any("lora_" in n for n in full)


def test_training_lowers_the_loss_and_reports_every_exit():
    """A few steps on a separable toy set: every exit's loss falls (ReeFL objective)."""
    from ml.data import ImageDataset

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 64)
    images = (rng.normal(0, 0.3, (64, 1, 8, 8)) + labels[:, None, None, None] * 2 - 1).astype(np.float32)
    data = ImageDataset(images, labels.astype(np.int64), ("a", "b"))

    class Task:
        num_labels = 2

        @staticmethod
        def batch(d, index):
            return {"pixel_values": torch.from_numpy(d.images[index]), "labels": torch.as_tensor(d.labels[index])}

    torch.manual_seed(0)
    model = ee.EarlyExitClassifier(_tiny_vit(2), 2, exit_blocks=(1, 2), exit_kind="ree")
    before = ee.evaluate(model, Task, data, batch_size=64)
    out = ee.train_early_exit(
        model, Task, data, objective=objective("reefl"), steps=30, batch_size=16,
        learning_rate=1e-3, exit_learning_rate=1e-2, seed=0, distill_weight=1.0,
    )
    after = ee.evaluate(model, Task, data, batch_size=64, thresholds=(0.6,))
    assert len(out["exit_losses"]) == 2 and len(out["loss_ema"]) == 2 and out["teacher"] in (0, 1)
    assert after["accuracy_mean"] > max(0.9, before["accuracy_mean"])
    assert 0.5 <= after["blocks_at_0.6"] <= 1.0


def test_digits_ship_with_scikit_learn():
    from ml.data import FederatedSplit

    split = FederatedSplit.make("digits", test_fraction=0.2, seed=42)
    assert len(split.test) + len(split.train_pool) == 1797 and split.test.class_names == tuple("0123456789")
    assert split.test.images.shape[1:] == (1, 8, 8) and -1.0 <= split.test.images.min() < split.test.images.max() <= 1.0
    part = split.partition(partition_id=1, num_partitions=4, alpha=0.5, seed=42)
    assert 0 < len(part) < len(split.train_pool)


def test_idle_parameters_are_those_the_forward_never_uses():
    model = ee.EarlyExitClassifier(_tiny_vit(4), 10, exit_blocks=(1, 2, 3, 4), exit_kind="ree")
    assert model.idle_parameters() == {"backbone.layernorm.weight", "backbone.layernorm.bias"}  # the exits replace it
    model.truncate(1)  # one block: nothing to modulate
    assert model.idle_parameters() == {"backbone.layernorm.weight", "backbone.layernorm.bias", "ree.gate.scale"}
    model(pixel_values=torch.zeros(2, 1, 8, 8))[0].sum().backward()
    assert {n for n, p in model.named_parameters() if p.grad is None} == model.idle_parameters()


def test_mutual_distillation_averages_over_the_other_exits_with_three_exits():
    """DepthFL: exit j learns from the mean of its KLs to the others. With two exits a sum
    and a mean are the same; with three they differ by 2x."""
    logits = [torch.tensor([[0.0, 1.0]]), torch.tensor([[2.0, 0.0]]), torch.tensor([[0.5, 0.5]])]
    kl = [[ee.distillation(logits[j], logits[i]).item() for i in range(3)] for j in range(3)]
    expected = sum((kl[j][(j + 1) % 3] + kl[j][(j + 2) % 3]) / 2 for j in range(3))
    assert ee.mutual_distillation_loss(logits).item() == pytest.approx(expected, rel=1e-6)
    assert expected > 0.05  # the terms are not all zero, so a sum would show (2x)


def test_reefl_teacher_is_the_exit_with_the_lowest_loss_ema():
    """Once every exit has a loss average, each step's teacher is its argmin: here the
    middle exit of three (its EMA starts lowest and stays so at decay 1)."""
    from ml.data import ImageDataset

    rng = np.random.default_rng(0)
    data = ImageDataset(rng.normal(size=(16, 1, 8, 8)).astype(np.float32), rng.integers(0, 2, 16).astype(np.int64), ("a", "b"))

    class Task:
        num_labels = 2

        @staticmethod
        def batch(d, index):
            return {"pixel_values": torch.from_numpy(d.images[index]), "labels": torch.as_tensor(d.labels[index])}

    teachers = []
    reefl = objective("reefl")

    def spy(logits, labels, **kw):
        teachers.append(kw["teacher"])
        return reefl(logits, labels, **kw)

    torch.manual_seed(0)
    model = ee.EarlyExitClassifier(_tiny_vit(3), 2, exit_blocks=(1, 2, 3), exit_kind="ree")
    out = ee.train_early_exit(
        model, Task, data, objective=spy, steps=3, batch_size=8, learning_rate=1e-3,
        exit_learning_rate=1e-2, seed=0, distill_weight=1.0, loss_ema=[5.0, 0.1, 3.0], ema_decay=1.0,
    )
    assert teachers == [1, 1, 1] and out["teacher"] == 1  # not the deepest (2), not the first (0)
