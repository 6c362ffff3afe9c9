"""Client-side DP-SGD (ml/privacy.py, client_app/privacy.py) and the server's handling of
DP replies (strategies/base.py): the LoRA really trains under Opacus, the epsilon a node
reports is a fresh Opacus accountant's for the same steps, spending is cumulative, and a
node whose budget is spent stops while the round goes on."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from torch import nn

from ml import loop
from ml.privacy import DPSGD, Ledger, noise_for_budget, sample_rate
from stamen import keys


def train_private(model, task, data, *, noise_multiplier, max_grad_norm, ledger=None, **options):
    """The training loop (ml/loop.py) under DP-SGD: what a node runs with dp.mode = "local"."""
    return loop.train(model, task, data, private=DPSGD(noise_multiplier, max_grad_norm, ledger or Ledger()), **options)


def fresh_epsilon(noise, rate, steps, delta):
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=noise, sample_rate=rate)
    return accountant.get_epsilon(delta=delta)


# --- the ledger ----------------------------------------------------------------------------
def test_sample_rate_is_one_over_the_batches_of_an_epoch():
    assert sample_rate(40, 4) == pytest.approx(0.1)
    assert sample_rate(41, 4) == pytest.approx(1 / 11)
    with pytest.raises(ValueError):
        sample_rate(0, 4)


def test_the_ledger_composes_rounds_like_one_accountant():
    ledger = Ledger().after(1.1, 0.05, 7).after(1.1, 0.05, 5)
    assert ledger.steps == 12
    assert ledger.epsilon(1e-5) == pytest.approx(fresh_epsilon(1.1, 0.05, 12, 1e-5), rel=1e-9)
    assert Ledger().epsilon(1e-5) == 0.0
    assert Ledger.from_array(ledger.to_array()) == ledger
    # more noise, less spent
    assert Ledger().after(2.0, 0.05, 12).epsilon(1e-5) < ledger.epsilon(1e-5)


def test_the_noise_for_a_target_spends_at_most_the_target():
    noise = noise_for_budget(epsilon=4.0, delta=1e-5, rate=0.02, steps=300)
    spent = Ledger().after(noise, 0.02, 300).epsilon(1e-5)
    assert 3.9 <= spent <= 4.0
    assert Ledger().after(noise * 0.9, 0.02, 300).epsilon(1e-5) > 4.0  # less noise would overspend


# --- DP-SGD on a tiny LoRA classifier ------------------------------------------------------
class TinyData:
    def __init__(self, n, seed=0):
        rng = np.random.default_rng(seed)
        self.x = rng.integers(0, 50, (n, 7))
        self.y = rng.integers(0, 3, n)

    def __len__(self):
        return len(self.y)


class TinyTask:
    def batch(self, data, index):
        x = torch.as_tensor(data.x[index])
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": torch.as_tensor(data.y[index])}

    def loss(self, model, batch):
        return model(**batch)[0]


TARGETS = ["backbone.encoder.layer.0.attention.self.query", "backbone.encoder.layer.1.attention.self.value"]


def tiny_lora_classifier():
    from transformers import BertConfig, BertModel

    from ml.lora import attach_fresh_lora
    from ml.model import EncoderClassifier

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=12,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # training is deterministic but for DP's draws
    model = EncoderClassifier(BertModel(config, add_pooling_layer=False), 3).eval()
    return attach_fresh_lora(model, TARGETS, rank=2, alpha=4.0, seed=0)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


OPTIONS = {"batch_size": 4, "learning_rate": 1e-2, "head_learning_rate": 1e-2, "noise_multiplier": 1.0, "max_grad_norm": 1.0}


def test_dp_sgd_trains_the_lora_and_head_and_nothing_else():
    model = tiny_lora_classifier()
    before = snapshot(model)
    result = train_private(model, TinyTask(), TinyData(40), steps=5, seed=0, **OPTIONS)
    after = snapshot(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    lora_b = {n for n in before if "lora_B" in n}
    assert lora_b and lora_b <= changed  # B starts at zero: a change is training, not an initialisation
    assert {n for n in before if "lora_A" in n} <= changed and {"head.weight", "head.bias"} <= changed
    assert all("lora_" in n or n.startswith("head.") for n in changed)  # the frozen base stays frozen
    assert result.ledger.history == [(1.0, 0.1, 5)] and result.rate == pytest.approx(0.1)
    assert math.isfinite(result.loss)
    # Opacus's hooks are gone: the same model trains and evaluates as before
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    model(**TinyTask().batch(TinyData(4), np.arange(4)))[0].backward()
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


def test_the_reported_epsilon_is_a_fresh_accountants_over_all_rounds():
    model, ledger = tiny_lora_classifier(), Ledger()
    for round_ in range(3):
        ledger = train_private(model, TinyTask(), TinyData(40), steps=4, seed=round_, ledger=ledger, **OPTIONS).ledger
    assert ledger.steps == 12
    assert ledger.epsilon(1e-5) == pytest.approx(fresh_epsilon(1.0, 0.1, 12, 1e-5), rel=1e-9)


def test_the_noise_is_applied():
    """Two runs that differ only in the seed of torch's generator (Poisson draws and noise)
    end apart; with the noise switched almost off and every example in every batch
    (batch size = data size, so q = 1 and Poisson sampling keeps each example with
    probability 1), they end together."""
    def lora_b_after(seed, noise, batch_size):
        model = tiny_lora_classifier()
        train_private(model, TinyTask(), TinyData(16), steps=3, seed=seed, **{**OPTIONS, "noise_multiplier": noise, "batch_size": batch_size})
        return torch.cat([p.detach().flatten() for n, p in model.named_parameters() if "lora_B" in n])

    noisy = (lora_b_after(0, 5.0, 16) - lora_b_after(1, 5.0, 16)).abs().max()
    quiet = (lora_b_after(0, 1e-9, 16) - lora_b_after(1, 1e-9, 16)).abs().max()
    # Adam divides by the gradient's running scale, so even 1e-9 noise moves coordinates
    # whose gradient is ~0 a little; noise at 5x the clipping norm moves everything
    assert quiet < 1e-3 and noisy > 10 * quiet and noisy > 1e-2


def test_a_data_free_regularizer_is_added_after_the_noise():
    from ml.lora import tail_norm

    model = tiny_lora_classifier()
    reg = lambda m: 10.0 * tail_norm(m, TARGETS, 0.5)  # noqa: E731
    result = train_private(model, TinyTask(), TinyData(40), steps=3, seed=0, regularizer=reg, **OPTIONS)
    assert result.ledger.steps == 3 and math.isfinite(result.loss)

    # and it really acts: with no data gradient and next to no noise, an L2 pull on A is
    # all that moves A, so (Adam's steps being about lr x the sign) nearly every entry shrinks;
    # without the regularizer the noise alone moves each entry either way, half of them out
    model = tiny_lora_classifier()
    a_params = {n: p for n, p in model.named_parameters() if "lora_A" in n}
    before = {n: p.detach().clone() for n, p in a_params.items()}
    pull = lambda m: 10.0 * sum((p**2).sum() for n, p in m.named_parameters() if "lora_A" in n)  # noqa: E731
    train_private(model, TinyTask(), TinyData(40), steps=5, seed=0, regularizer=pull, loss=lambda m, b: 0.0 * m(**b)[0],
                  **{**OPTIONS, "noise_multiplier": 1e-6})
    shrunk = torch.cat([(a_params[n].detach().abs() < before[n].abs()).flatten() for n in before]).float()
    assert shrunk.numel() >= 64 and shrunk.mean().item() > 0.9


def test_the_optimizer_groups_come_from_the_learning_rates_or_explicit_groups_not_both():
    model = tiny_lora_classifier()
    common = {k: v for k, v in OPTIONS.items() if "learning_rate" not in k}
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": 1e-2}]
    with pytest.raises(TypeError, match="needs learning_rate and head_learning_rate"):
        train_private(model, TinyTask(), TinyData(40), steps=1, seed=0, learning_rate=1e-2, **common)
    with pytest.raises(TypeError, match="not both"):
        train_private(model, TinyTask(), TinyData(40), steps=1, seed=0, groups=groups, **OPTIONS)
    assert train_private(model, TinyTask(), TinyData(40), steps=1, seed=0, groups=groups, **common).ledger.steps == 1


def test_causal_lm_example_loss_is_the_mean_of_each_sequences_own_loss():
    from transformers import LlamaConfig, LlamaForCausalLM

    from ml.tasks import CausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1, intermediate_size=20, head_dim=8)).eval()
    ids = torch.randint(1, 30, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    labels = ids.masked_fill(mask == 0, -100)
    task = CausalLM.__new__(CausalLM)  # no tokenizer needed for the loss
    with torch.no_grad():
        both = task.example_loss(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
        own = [model(input_ids=ids[i : i + 1, : n], labels=ids[i : i + 1, : n]).loss for i, n in enumerate((6, 3))]
        token_mean = task.loss(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
    assert both.item() == pytest.approx(((own[0] + own[1]) / 2).item(), rel=1e-5)
    assert token_mean.item() == pytest.approx(((5 * own[0] + 2 * own[1]) / 7).item(), rel=1e-5)  # what DP must not use


# --- early-exit models under DP-SGD ----------------------------------------------------------
def _bert(layers=4):
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=32,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # one-at-a-time must see the same model
    return BertModel(config, add_pooling_layer=False)


def _vit(layers=4):
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=layers,
                       num_attention_heads=2, intermediate_size=32)
    return ViTModel(config, add_pooling_layer=False)


def _early_exit_case(case):
    from ml import early_exit as ee

    torch.manual_seed(0)
    if case == "reefl-vit-full":
        model = ee.EarlyExitClassifier(_vit(), 10, exit_blocks=(2, 4), exit_kind="ree")
        ee.set_tuning(model, "full")
        batch = {"pixel_values": torch.randn(3, 1, 8, 8), "labels": torch.tensor([1, 2, 3])}
        return model, batch, "reefl"
    ids = torch.randint(0, 50, (3, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[2, 4:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 2])}
    if case == "reefl-bert-lora":
        model = ee.EarlyExitClassifier(_bert(), 3, exit_blocks=(2, 4), exit_kind="ree", pooling="mean")
        ee.set_tuning(model, "lora", lora_rank=2)
        with torch.no_grad():
            model.ree.gate.scale.fill_(0.5)  # open, so the gate's gradient is not zero
        return model, batch, "reefl"
    model = ee.EarlyExitClassifier(_bert(), 3, exit_blocks=(1, 2, 4), exit_kind="per-exit", pooling="mean")
    ee.set_tuning(model, "lora", lora_rank=2)
    return model, batch, "depthfl"


@pytest.mark.parametrize("case", ["reefl-vit-full", "reefl-bert-lora", "depthfl-bert-lora"])
def test_opacus_per_example_gradients_of_the_early_exit_models_are_exact(case):
    """For every trainable parameter (the backbone's, the shared Ree module's tokens, layers
    and gate, the heads), Opacus's per-example gradient equals the gradient of that
    example's loss taken alone. ReeFL's module runs after every block (Opacus sums its
    per-example gradients over the calls). The Ree tokens and gate use Stamen's rules
    (register_grad_samplers), the ViT's embeddings Opacus's functorch fallback."""
    from opacus import GradSampleModule
    from opacus.grad_sample import GradSampleModule as Hooks

    from client_app.methods import METHODS
    from ml.layers import ExitTokens, LayerScale
    from ml.privacy import register_grad_samplers

    register_grad_samplers()
    assert {ExitTokens, LayerScale} <= set(Hooks.GRAD_SAMPLERS)

    model, batch, method = _early_exit_case(case)
    objective = METHODS[method]().loss
    model.train()
    labels = batch.pop("labels")
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def loss_of(m, b, y):
        return objective(m(**b), y, distill_weight=1.0, teacher=model.max_exit - 1, temperature=1.0)[0]

    alone = {n: [] for n, _ in trainable}
    for i in range(len(labels)):
        model.zero_grad(set_to_none=True)
        loss_of(model, {k: v[i : i + 1] for k, v in batch.items()}, labels[i : i + 1]).backward()
        for n, p in trainable:
            alone[n].append(torch.zeros_like(p) if p.grad is None else p.grad.clone())
    model.zero_grad(set_to_none=True)
    wrapped = GradSampleModule(model, loss_reduction="mean")
    try:
        loss_of(wrapped, batch, labels).backward()
        assert any(n.startswith("ree.gate.") for n, _ in trainable) == case.startswith("reefl")
        for n, p in trainable:
            torch.testing.assert_close(p.grad_sample, torch.stack(alone[n]), rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    finally:
        wrapped._close()


def test_a_parameter_opacus_cannot_see_stops_dp_sgd():
    """The old shape of ReeFL's gate: a parameter of a module that Opacus handles as a whole,
    used outside that module's forward. Opacus gives it a zero per-example gradient, so
    DP-SGD would train it on noise alone; train_private refuses instead."""

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4))
            self.gate = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return x * self.weight

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 4)
            self.holder = Holder()
            self.head = nn.Linear(4, 3)

        def forward(self, input_ids, attention_mask, labels):
            x = self.embed(input_ids).mean(1)
            return (F.cross_entropy(self.head(self.holder(x) * self.holder.gate), labels),)

    torch.manual_seed(0)
    model = Model()
    model.embed.weight.requires_grad_(False)
    with pytest.raises(RuntimeError, match=r"holder\.gate \(off by"):
        train_private(model, TinyTask(), TinyData(40), steps=2, seed=0, **{**OPTIONS, "batch_size": 20})


def _digits_like(n=48):
    from ml.data import ImageDataset

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, n)
    images = (rng.normal(0, 0.3, (n, 1, 8, 8)) + labels[:, None, None, None] * 2 - 1).astype(np.float32)
    return ImageDataset(images, labels.astype(np.int64), ("a", "b"))


class ImageTask:
    num_labels = 2

    @staticmethod
    def batch(d, index):
        return {"pixel_values": torch.from_numpy(d.images[index]), "labels": torch.as_tensor(d.labels[index])}


def test_reefl_trains_every_part_under_dp_sgd_with_the_deepest_exit_as_teacher():
    from client_app.methods import METHODS
    from ml import early_exit as ee

    torch.manual_seed(0)
    model = ee.EarlyExitClassifier(_vit(2), 2, exit_blocks=(1, 2), exit_kind="ree")
    with pytest.raises(RuntimeError, match=r"take no part in the loss: backbone\.layernorm\.weight"):  # the ViT's final norm
        ee.train_early_exit(model, ImageTask, _digits_like(), objective=METHODS["exclusivefl"]().loss, steps=1, batch_size=8, learning_rate=1e-3,
                            exit_learning_rate=1e-2, seed=0, private=DPSGD(1.0, 1.0))
    ee.set_tuning(model, "full")  # every parameter of the blocks, none past them
    before = snapshot(model)
    out = ee.train_early_exit(
        model, ImageTask, _digits_like(), objective=METHODS["reefl"]().loss, steps=4, batch_size=8, learning_rate=1e-3,
        exit_learning_rate=1e-2, seed=0, distill_weight=1.0, loss_ema=[0.1, 5.0],  # un-noised EMA would pick exit 1
        private=DPSGD(1.0, 1.0, Ledger().after(1.0, 1 / 6, 3)),
    )
    after = snapshot(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("backbone.embeddings.") for n in trainable) and {"ree.gate.scale", "ree.tokens.meta"} <= trainable
    assert {n for n in before if not torch.equal(before[n], after[n])} == trainable
    assert out["teacher"] == 1 and out["loss_ema"] == [0.1, 5.0]  # fixed to the deepest exit, the EMA untouched
    assert len(out["exit_losses"]) == 2 and math.isfinite(out["loss"])
    ledger = out["ledger"]
    assert ledger.steps == 7 and ledger.epsilon(1e-5) == pytest.approx(fresh_epsilon(1.0, 1 / 6, 7, 1e-5), rel=1e-9)
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


def test_fedspine_prunes_from_the_noised_gradients_and_accounts_every_phase():
    """Round 1 of FedSpine trains in three phases (score, prune to half the ratio, score,
    prune, tune); each is its own Opacus run and the ledger holds all their steps. The
    unit importance is read from the clipped and noised gradients (post-processing)."""
    from ml import pruning

    def run(seed, noise):
        model = tiny_lora_classifier()
        out = pruning.train_pruned(
            model, TinyTask(), TinyData(40), ratio=0.5, steps=8, seed=seed, batch_size=4, learning_rate=1e-2,
            head_learning_rate=1e-2, private=DPSGD(noise, 1.0),
        )
        return model, out

    model, out = run(0, 1.0)
    assert out["ledger"].history == [(1.0, 0.1, 8)]  # 2 + 2 + 4 steps; Opacus merges equal (noise, rate) entries
    assert out["ledger"].epsilon(1e-5) == pytest.approx(fresh_epsilon(1.0, 0.1, 8, 1e-5), rel=1e-9)
    assert {k: len(v) for k, v in out["kept"].items()} == {
        "backbone.encoder.layer.0.attention": 2, "backbone.encoder.layer.1.attention": 2,
        "backbone.encoder.layer.0.mlp": 6, "backbone.encoder.layer.1.mlp": 6,
    }
    assert model.backbone.encoder.layer[0].attention.self.query.base_layer.weight.shape == (8, 16)
    # the scores are squared LoRA gradients: read after the noise, they grow with it (a
    # clipped per-example gradient is at most 1; noise 1e4 adds ~1e4/4 per coordinate)
    quiet, loud = run(0, 1e-9)[1]["scores"], run(0, 1e4)[1]["scores"]
    with_lora = "backbone.encoder.layer.0.attention"  # its query has LoRA (TARGETS)
    assert loud[with_lora].sum() > 1e6 * quiet[with_lora].sum() > 0
    without = "backbone.encoder.layer.1.mlp"  # no LoRA: scored from its pretrained weights, data-free
    np.testing.assert_allclose(loud[without], quiet[without])


def test_a_causal_lm_trains_under_dp_sgd_and_passes_the_per_example_check():
    """A tiny Llama (tied embeddings, padded sequences) with LoRA on its attention: the
    per-example check of the first step passes, and every B factor trains."""
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from ml.tasks import CausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=1, intermediate_size=20, head_dim=8, tie_word_embeddings=True))
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.0), model)
    for n, p in model.named_parameters():
        p.requires_grad = "lora_" in n

    class Sequences(CausalLM):
        def __init__(self):  # no tokenizer: the batches are token ids already
            pass

        def batch(self, data, index):
            ids = torch.as_tensor(data.x[index])
            mask = torch.ones_like(ids)
            mask[::2, 5:] = 0  # every other sequence is padded
            return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    data = TinyData(40)
    data.x = np.random.default_rng(0).integers(1, 30, (40, 8))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    result = train_private(model, Sequences(), data, steps=3, seed=0, **{**OPTIONS, "batch_size": 8})
    assert result.ledger.history == [(1.0, 0.2, 3)] and math.isfinite(result.loss)
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in before)


# --- the node's budget ------------------------------------------------------------------------
def dp_config(**dp):
    import tomllib

    from stamen.config import StamenConfig

    raw = tomllib.load(open("pyproject.toml", "rb"))["tool"]["flwr"]["app"]["config"]
    raw.update({"dp.mode": "local", "strategy.num-rounds": 3, "train.local-steps": 10, "train.batch-size": 8})
    raw.update({k if "." in k else f"dp.{k.replace('_', '-')}": v for k, v in dp.items()})
    return StamenConfig.from_run_config(raw)


def context():
    return Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})


def test_a_target_epsilon_is_spread_over_the_planned_rounds():
    from client_app.privacy import RoundPrivacy

    cfg, ctx = dp_config(epsilon=2.0), context()
    spent = []
    for _ in range(3):
        plan = RoundPrivacy.plan(cfg, ctx, num_examples=200)
        assert not plan.exhausted()
        plan.save(ctx, plan.ledger.after(plan.noise_multiplier, plan.rate, plan.steps))  # as if it trained
        spent.append(RoundPrivacy.plan(cfg, ctx, 200).ledger.epsilon(1e-5))
    assert spent[0] < spent[1] < spent[2] <= 2.0 * 1.01 and spent[2] > 1.9
    assert RoundPrivacy.plan(cfg, ctx, 200).exhausted()  # a 4th round would overspend


def spend_a_round(cfg, ctx):
    from client_app.privacy import RoundPrivacy

    plan = RoundPrivacy.plan(cfg, ctx, num_examples=200)
    plan.save(ctx, plan.ledger.after(plan.noise_multiplier, plan.rate, plan.steps))  # as if it trained
    return plan


def test_a_restarted_node_continues_at_the_ledger_on_its_disk(flwr_home):
    """A restarted SuperNode has an empty context.state: the ledger file, keyed by run and
    partition, holds what it spent. Without it the node would start again at epsilon 0."""
    from client_app.privacy import LedgerFile, RoundPrivacy

    cfg = dp_config(noise_multiplier=1.0)
    node = {"partition-id": 3}
    before = Context(run_id=5, node_id=7, node_config=node, state=RecordDict(), run_config={})
    spend_a_round(cfg, before)
    spend_a_round(cfg, before)
    restarted = Context(run_id=5, node_id=99, node_config=node, state=RecordDict(), run_config={})  # a new node id, no state
    plan = RoundPrivacy.plan(cfg, restarted, num_examples=200)
    assert plan.ledger.steps == 20 and plan.ledger.epsilon(1e-5) == pytest.approx(RoundPrivacy.plan(cfg, before, 200).ledger.epsilon(1e-5))
    path = flwr_home / "stamen-state" / "dp-ledger" / "run-5" / "partition-3.json"
    assert LedgerFile.for_context(restarted).path == path and [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left
    # another run, or another partition, has spent nothing
    assert RoundPrivacy.plan(cfg, Context(run_id=6, node_id=7, node_config=node, state=RecordDict(), run_config={}), 200).ledger.steps == 0
    assert RoundPrivacy.plan(cfg, Context(run_id=5, node_id=7, node_config={"partition-id": 4}, state=RecordDict(), run_config={}), 200).ledger.steps == 0
    # node-config state-dir puts it elsewhere
    elsewhere = Context(run_id=5, node_id=7, node_config={**node, "state-dir": str(flwr_home / "disk")}, state=RecordDict(), run_config={})
    assert LedgerFile.for_context(elsewhere).path == flwr_home / "disk" / "dp-ledger" / "run-5" / "partition-3.json"


def test_a_resumed_run_continues_the_ledger_of_the_run_it_resumes(flwr_home):
    """A resumed run is a new Flower run (run id 6) whose instructions name the run it
    continues (ledger-run 5): the node starts at what it spent in run 5, and writes the
    new total where the next resume of run 5 reads it. A ledger-run cannot hide what the
    node spent in its own run."""
    from client_app.privacy import LedgerFile, RoundPrivacy

    cfg = dp_config(noise_multiplier=1.0)
    node = {"partition-id": 3}
    spend_a_round(cfg, Context(run_id=5, node_id=7, node_config=node, state=RecordDict(), run_config={}))
    resumed = Context(run_id=6, node_id=42, node_config=node, state=RecordDict(), run_config={})
    assert RoundPrivacy.plan(cfg, resumed, 200).ledger.steps == 0  # without the name: a fresh ledger
    plan = RoundPrivacy.plan(cfg, resumed, 200, ledger_run="5")
    assert plan.ledger.steps == 10
    plan.save(resumed, plan.ledger.after(plan.noise_multiplier, plan.rate, plan.steps))
    again = Context(run_id=7, node_id=43, node_config=node, state=RecordDict(), run_config={})
    assert RoundPrivacy.plan(cfg, again, 200, ledger_run=5).ledger.steps == 20  # the next resume
    assert LedgerFile.for_context(resumed).read().steps == 20  # and its own run's file
    # a name that is not a run, or a run where nothing was spent, adds nothing and hides nothing
    assert RoundPrivacy.plan(cfg, resumed, 200, ledger_run="x").ledger.steps == 20
    assert RoundPrivacy.plan(cfg, resumed, 200, ledger_run=999).ledger.steps == 20


def test_the_longer_ledger_wins_whichever_place_holds_it(flwr_home):
    """The state may be ahead of the disk (a file lost with a wiped disk) or behind it (a
    restart): the plan starts from the one with more steps."""
    from client_app.privacy import LedgerFile, RoundPrivacy

    cfg, ctx = dp_config(noise_multiplier=1.0), context()
    spend_a_round(cfg, ctx)
    spend_a_round(cfg, ctx)
    LedgerFile.for_context(ctx).path.unlink()
    assert RoundPrivacy.plan(cfg, ctx, 200).ledger.steps == 20  # from the state


def test_a_damaged_ledger_file_stops_the_node_from_training(flwr_home):
    from client_app.privacy import LedgerFile, LedgerUnreadable, RoundPrivacy

    cfg, ctx = dp_config(noise_multiplier=1.0), context()
    spend_a_round(cfg, ctx)
    path = LedgerFile.for_context(ctx).path
    for damage in ("{not json", '{"format": "stamen-dp-ledger", "version": 1, "run-id": 2, "partition-id": 0, "history": []}',
                   '{"format": "stamen-dp-ledger", "version": 1, "run-id": 1, "partition-id": 0, "history": [[1.0]]}'):
        path.write_text(damage)
        with pytest.raises(LedgerUnreadable, match="does not train|run 2 partition 0"):
            RoundPrivacy.plan(cfg, ctx, 200)


def test_a_node_over_budget_replies_with_the_reason_and_no_update(flower_identity):
    from client_app.privacy import RoundPrivacy

    cfg, ctx = dp_config(noise_multiplier=1.0, epsilon=0.5), context()
    plan = RoundPrivacy.plan(cfg, ctx, num_examples=200)
    assert plan.noise_multiplier == 1.0 and plan.exhausted()  # 10 steps at q = 1/25 cost more than 0.5
    instruction = Message(RecordDict({keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: 1})}), dst_node_id=7, message_type="train")
    reply = plan.stop_reply(instruction, 1)
    metrics = reply.content.metric_records[keys.METRICS]
    assert metrics[keys.DP_STOPPED] == 1 and metrics[keys.DP_EPSILON] == 0.0 and len(reply.content.array_records[keys.ARRAYS]) == 0
    assert "dp.epsilon 0.5" in reply.content.config_records[keys.DP_STATUS]["reason"]


def test_dp_config_is_checked_at_the_door():
    from stamen.config import ConfigError

    with pytest.raises(ConfigError, match="noise-multiplier > 0 or a target"):
        dp_config()
    for name in ("fedspine", "reefl", "depthfl", "inclusivefl", "exclusivefl"):  # every strategy trains under local DP
        assert dp_config(noise_multiplier=1.0, **{"strategy.name": name}).dp.local
    with pytest.raises(ConfigError, match="central"):
        dp_config(mode="central", noise_multiplier=1.0, **{"strategy.name": "hetlora"})


# --- the server side ----------------------------------------------------------------------
def test_a_spent_node_is_dropped_retired_and_the_round_goes_on(flower_identity, fake_grid, tmp_path):
    from strategies.flora import FLoRA
    from strategies.lora_records import to_record
    from tests.test_flora_strategy import global_state, good_reply

    strategy = FLoRA(node_ranks={1: 2, 2: 2}, default_rank=2, lora_alpha=8.0, min_nodes=1)
    msgs = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, to_record(global_state()), ConfigRecord(), fake_grid([1, 2]))}
    trained, _ = good_reply(msgs[1], rank=2, n=10, seed=1)
    dp = {keys.DP_EPSILON: 0.8, keys.DP_DELTA: 1e-5, keys.DP_NOISE: 1.1, keys.DP_SAMPLE_RATE: 0.1, keys.DP_STEPS: 10}
    for k, v in dp.items():
        trained.content.metric_records[keys.METRICS][k] = v
    stopped = Message(
        RecordDict({
            keys.ARRAYS: to_record({}),
            keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 0, keys.DP_STOPPED: 1, **dp, keys.DP_EPSILON: 3.9}),
            keys.DP_STATUS: ConfigRecord({"reason": "privacy budget: epsilon 3.900 spent"}),
        }),
        reply_to=msgs[2],
    )
    arrays, metrics = strategy.aggregate_train(1, [trained, stopped])
    assert arrays is not None and metrics["num-clients"] == 1  # node 1's update went in
    assert strategy.rounds[-1].dropped == {2: "privacy budget: epsilon 3.900 spent"}
    assert strategy.retired == {2: "privacy budget: epsilon 3.900 spent"}
    assert [(r["node_id"], r["epsilon"], r["status"]) for r in strategy.privacy_log] == [(1, 0.8, "trained"), (2, 3.9, "budget-spent")]
    assert strategy.privacy_summary() == {1: 0.8, 2: 3.9}
    # node 2 is never sampled again
    for _ in range(5):
        nodes = {m.metadata.dst_node_id for m in strategy.configure_train(2, arrays, ConfigRecord(), fake_grid([1, 2]))}
        assert nodes == {1}


# --- through the ClientApp's train handler, for every LoRA strategy --------------------------
@pytest.mark.parametrize("name", ["flora", "hetlora", "fedspine"])  # fedit and flexlora train through the same path as hetlora (a sent adapter)
def test_two_private_rounds_through_the_train_handler(name, flower_identity, fake_grid, tiny_bert, run_config):
    """The client's own path (the model moved to its device, then the LoRA injected; opacus
    issue #820): the LoRA trains under DP-SGD, and the epsilon each reply reports is a fresh
    accountant's for all the steps the node has taken since the start of the run."""
    from client_app.app import train
    from ml.model import adapted_weights, head_state, load_model, target_module_names
    from strategies import STRATEGIES
    from strategies.bandit import Arm
    from strategies.lora_records import from_record, join_global, to_record

    run_config.update({
        "model.path": str(tiny_bert), "train.local-steps": 3, "train.batch-size": 4, "model.max-seq-len": 32,
        "strategy.name": name, "dp.mode": "local", "dp.noise-multiplier": 0.8, "dp.max-grad-norm": 1.0,
    })
    server_model = load_model("text-classification", str(tiny_bert), num_labels=5)
    targets = target_module_names(server_model)
    arrays = to_record(join_global(adapted_weights(server_model, targets), head_state(server_model)))
    extra = {"arms": [Arm(0.5, 4)]} if name == "fedspine" else {}  # prune half the heads and channels, rank 4
    strategy = STRATEGIES[name](node_ranks={7: 4, 8: 4}, default_rank=4, lora_alpha=16.0, min_nodes=1, **extra)
    contexts = {
        n: Context(run_id=1, node_id=n, node_config={"partition-id": i, "num-partitions": 8}, state=RecordDict(), run_config=run_config)
        for i, n in enumerate((7, 8))
    }
    for server_round in (1, 2):
        msgs = list(strategy.configure_train(server_round, arrays, ConfigRecord(), fake_grid([7, 8])))
        replies = [train(m, contexts[m.metadata.dst_node_id]) for m in msgs]
        for reply in replies:
            metrics = reply.content.metric_records[keys.METRICS]
            factors = from_record(reply.content.array_records[keys.ARRAYS])
            assert np.abs(factors[targets[0] + keys.LORA_B]).max() > 0  # B starts at zero (FLoRA) or as sent: it trained
            assert metrics[keys.DP_STEPS] == 3 * server_round
            expected = fresh_epsilon(0.8, metrics[keys.DP_SAMPLE_RATE], 3 * server_round, 1e-5)
            assert metrics[keys.DP_EPSILON] == pytest.approx(expected, rel=1e-9)
        arrays, agg = strategy.aggregate_train(server_round, replies)
        assert agg["num-clients"] == 2
    assert [r["round"] for r in strategy.privacy_log] == [1, 1, 2, 2]
    assert all(r["status"] == "trained" for r in strategy.privacy_log)


VIT = "vit:image_size=8,patch_size=4,num_channels=1,hidden_size=16,num_hidden_layers=4,num_attention_heads=2,intermediate_size=32"


@pytest.mark.parametrize("name", ["reefl", "inclusivefl"])
def test_two_private_early_exit_rounds_through_the_train_handler(name, flower_identity, fake_grid, run_config):
    """ReeFL and a baseline on digits with a fully tuned ViT, a shallow (exit 1) and a deep
    node: every parameter a node is sent trains under DP-SGD (InclusiveFL sends one head:
    the unsent heads are frozen, not trained on noise), and the epsilon is cumulative."""
    from client_app.app import train
    from ml.early_exit import model_from_config
    from ml.tasks import ImageClassification
    from stamen.config import StamenConfig
    from strategies import STRATEGIES
    from strategies.lora_records import from_record, to_record

    run_config.update({
        "strategy.name": name, "model.task": "image-classification", "model.path": VIT, "data.name": "digits",
        "early-exit.tuning": "full", "train.local-steps": 3, "train.batch-size": 16,
        "dp.mode": "local", "dp.noise-multiplier": 0.8, "dp.max-grad-norm": 1.0,
    })
    cfg = StamenConfig.from_run_config(run_config)
    model = model_from_config(ImageClassification(VIT, num_labels=10), cfg, exit_kind=STRATEGIES[name].exit_kind)
    strategy = STRATEGIES[name].from_config(
        cfg, node_exits={7: 1, 8: 4}, num_exits=4, required_exits=model.required_exits(), min_nodes=1
    )
    contexts = {
        n: Context(run_id=1, node_id=n, node_config={"partition-id": i, "num-partitions": 8}, state=RecordDict(), run_config=run_config)
        for i, n in enumerate((7, 8))
    }
    arrays = to_record(model.trainable_state())
    for server_round in (1, 2):
        msgs = list(strategy.configure_train(server_round, arrays, ConfigRecord(), fake_grid([7, 8])))
        replies = [train(m, contexts[m.metadata.dst_node_id]) for m in msgs]
        for m, reply in zip(msgs, replies, strict=True):
            sent = from_record(m.content.array_records[keys.ARRAYS])
            back = from_record(reply.content.array_records[keys.ARRAYS])
            assert set(back) == set(sent)
            shallow = m.metadata.dst_node_id == 7
            moved = {k for k in sent if not np.array_equal(back[k], sent[k])}
            # one block: no modulation, so the gate is idle and comes back as sent
            assert moved == set(sent) - ({"ree.gate.scale"} if shallow and name == "reefl" else set())
            metrics = reply.content.metric_records[keys.METRICS]
            assert metrics[keys.DP_STEPS] == 3 * server_round and metrics[keys.TEACHER_EXIT] == metrics[keys.MAX_EXIT]
            expected = fresh_epsilon(0.8, metrics[keys.DP_SAMPLE_RATE], 3 * server_round, 1e-5)
            assert metrics[keys.DP_EPSILON] == pytest.approx(expected, rel=1e-9)
        arrays, agg = strategy.aggregate_train(server_round, replies)
        assert agg["num-clients"] == 2
    assert [(r["round"], r["status"]) for r in strategy.privacy_log] == [(1, "trained")] * 2 + [(2, "trained")] * 2


def test_dp_sgd_noise_is_not_reproducible_from_the_seed():
    """The server and every node know train.seed: the noise must come from elsewhere. Two
    runs with the same seed and inputs end with different parameters (other noise)."""
    from ml import privacy

    drawn = []
    original = privacy.noise_generator

    def recording(device):
        generator = original(device)
        drawn.append(generator.initial_seed())
        return generator

    outcomes = []
    for _ in range(2):
        model = tiny_lora_classifier()
        privacy.noise_generator, saved = recording, privacy.noise_generator
        try:
            train_private(model, TinyTask(), TinyData(40), steps=3, seed=0, **OPTIONS)
        finally:
            privacy.noise_generator = saved
        outcomes.append(snapshot(model))
    moved = [n for n in outcomes[0] if "lora_B" in n]
    assert moved and all(not torch.equal(outcomes[0][n], outcomes[1][n]) for n in moved)  # other noise
    assert len(drawn) == 2 and drawn[0] != drawn[1] and 0 not in drawn  # fresh OS entropy each time, not the seed


def test_dp_sgd_adds_noise_of_std_z_c_over_the_expected_batch():
    """With a loss whose per-example gradients are zero, what reaches the parameters is the
    noise alone: N(0, (z C)^2) on the sum, divided by the expected batch (rate x N = 4)."""
    model = tiny_lora_classifier()
    trainable = [p for p in model.parameters() if p.requires_grad]
    seen = []
    options = {**OPTIONS, "noise_multiplier": 2.0, "max_grad_norm": 1.5}
    train_private(model, TinyTask(), TinyData(40), steps=8, seed=0, loss=lambda m, b: 0.0 * m(**b)[0],
                  on_gradients=lambda: seen.append(torch.cat([p.grad.flatten() for p in trainable])), **options)
    noise = torch.cat(seen)
    assert len(seen) == 8 and noise.numel() > 1000
    assert noise.std().item() == pytest.approx(2.0 * 1.5 / 4, rel=0.1)  # z C / expected batch; sampling error ~2%
    assert abs(noise.mean().item()) < 0.1


def test_a_node_whose_dp_steps_go_backwards_is_refused_and_its_largest_epsilon_reported(flower_identity, fake_grid):
    """A node that lost its ledger (a SuperNode restarted with a fresh state) would report
    fewer steps and a smaller epsilon, and spend its budget again. The server drops and
    retires it, and the summary keeps the largest epsilon it ever reported."""
    from strategies.flora import FLoRA
    from strategies.lora_records import to_record
    from tests.test_flora_strategy import global_state, good_reply

    strategy = FLoRA(node_ranks={1: 2, 2: 2}, default_rank=2, lora_alpha=8.0, min_nodes=1)
    arrays = to_record(global_state())

    def round_of(server_round, reported):
        msgs = {m.metadata.dst_node_id: m for m in strategy.configure_train(server_round, arrays, ConfigRecord(), fake_grid([1, 2]))}
        replies = []
        for node, (epsilon, steps) in reported.items():
            reply, _ = good_reply(msgs[node], rank=2, n=10, seed=node)
            dp = {keys.DP_EPSILON: epsilon, keys.DP_DELTA: 1e-5, keys.DP_NOISE: 1.1, keys.DP_SAMPLE_RATE: 0.1, keys.DP_STEPS: steps}
            for k, v in dp.items():
                reply.content.metric_records[keys.METRICS][k] = v
            replies.append(reply)
        return strategy.aggregate_train(server_round, replies)

    round_of(1, {1: (0.8, 10), 2: (0.9, 10)})
    _, metrics = round_of(2, {1: (1.2, 20), 2: (0.9, 10)})  # node 2 made no progress: steps equal is fine
    assert metrics["num-clients"] == 2
    _, metrics = round_of(3, {1: (1.5, 30), 2: (0.4, 5)})  # node 2 starts over
    assert metrics["num-clients"] == 1 and "went backwards (5 after 10)" in strategy.rounds[-1].dropped[2]
    assert 2 in strategy.retired
    assert [r["status"] for r in strategy.privacy_log if r["node_id"] == 2] == ["trained", "trained", "refused"]
    assert strategy.privacy_summary() == {1: 1.5, 2: 0.9}  # not node 2's later 0.4
