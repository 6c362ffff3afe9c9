"""Early-exit transformer encoders: exits at chosen blocks, and the exit modules ReeFL and
its baselines put on them.

A backbone (a Hugging Face BERT-like text encoder, or a ViT built from a config) is run
block by block. After block ``b`` for ``b`` in ``exit_blocks`` an exit produces logits. Two
kinds of exit module:

* ``"ree"`` (ReeFL, Lee et al., ICML 2024): one shared :class:`ReeModule`, a small
  transformer layer over ``[meta token; CLS of block 1; ...; CLS of block b]`` plus a
  learned positional embedding. It runs after every block. At an exit block the logits
  are ``head(meta output + that block's CLS)`` from one shared head; after every block
  its output at that block's position replaces the CLS token fed to the next block
  (modulation). For text encoders trained with mean pooling (all-MiniLM-L6-v2) a block's
  feature is the mean over its tokens instead of CLS, and modulation adds the module's
  update (output minus input at that position) to the CLS token: replacing the CLS
  state of a pretrained BERT with a pooled vector breaks the blocks above it.
* ``"per-exit"`` (DepthFL, InclusiveFL, ExclusiveFL): one head per exit on that block's
  CLS, nothing shared.

A model built with ``max_exit=e`` holds and runs the blocks up to ``exit_blocks[e-1]``
only: a shallow device really does less work and holds less memory.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .layers import ExitTokens, LayerScale
from .loop import train
from .privacy import DPSGD
from .tasks import to_device
from .tensors import source_tensor

EXIT_KINDS = ("ree", "per-exit")
POOLINGS = ("cls", "mean")
TUNINGS = ("full", "lora", "frozen")
_BLOCK = re.compile(r"^backbone\.(?:encoder\.layer|layers)\.(\d+)\.")  # BERT: encoder.layer, ViT: layers
_LORA_TARGETS = ("query", "value", "q_proj", "v_proj")  # BERT, ViT (transformers 5)


def backbone_blocks(backbone: nn.Module) -> nn.ModuleList:
    """The backbone's stack of transformer blocks."""
    if hasattr(backbone, "encoder") and hasattr(backbone.encoder, "layer"):
        return backbone.encoder.layer
    if isinstance(getattr(backbone, "layers", None), nn.ModuleList):
        return backbone.layers
    raise ValueError(f"{type(backbone).__name__}: no encoder.layer or layers stack to put exits on")


def exit_blocks_for(num_blocks: int, requested: Sequence[int] = (), num_exits: int = 4) -> tuple[int, ...]:
    """The blocks (1-based) that end in an exit: ``requested`` if given, else ``num_exits``
    spread evenly with the last at the top (6 blocks, 4 exits: 2 3 5 6)."""
    blocks = tuple(requested) or tuple(math.ceil(num_blocks * k / num_exits) for k in range(1, num_exits + 1))
    if list(blocks) != sorted(set(blocks)) or blocks[0] < 1 or blocks[-1] > num_blocks:
        raise ValueError(f"exit blocks {blocks}: must be increasing block numbers in 1..{num_blocks}")
    return blocks


def required_exit(name: str, exit_blocks: Sequence[int]) -> int:
    """The smallest max exit (1-based) of a model that holds parameter ``name``.

    Block ``i`` (0-based) is held by models whose last block ``exit_blocks[e-1] > i``;
    ``heads.<j>.*`` (one head per exit) by models with ``e > j``; everything else (the
    embeddings, the shared Ree module and head) by every model."""
    if m := _BLOCK.match(name):
        block = int(m.group(1))
        return next(e for e, b in enumerate(exit_blocks, 1) if b > block)
    if m := re.match(r"^heads\.(\d+)\.", name):
        return int(m.group(1)) + 1
    return 1


class ExitHead(nn.Module):
    """LayerNorm then Linear: the backbone's hidden states are not normalised mid-stack."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x))


class _Attention(nn.Module):
    """Multi-head self-attention with a narrow inner width (``attn_dim``), so the module
    stays small next to the backbone."""

    def __init__(self, dim: int, heads: int, attn_dim: int) -> None:
        super().__init__()
        if attn_dim % heads:
            raise ValueError(f"Ree attention width {attn_dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * attn_dim)
        self.out = nn.Linear(attn_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, n, -1))


class ReeModule(nn.Module):
    """The shared recurrent exit module: a pre-norm transformer layer over a learnable meta
    token and the CLS features of the blocks run so far, with a positional embedding per
    block. ``gate`` scales the update modulation writes into the CLS token (used by
    :class:`EarlyExitClassifier`, not here)."""

    def __init__(
        self, dim: int, num_blocks: int, *, heads: int = 4, attn_dim: int = 32, mlp_ratio: float = 1.35, gate_init: float = 0.0
    ) -> None:
        super().__init__()
        self.tokens = ExitTokens(dim, num_blocks)
        self.norm1 = nn.LayerNorm(dim)
        self.attention = _Attention(dim, heads, attn_dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = max(1, int(dim * mlp_ratio))
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        # how much of the module's update modulation writes into the CLS token, per
        # channel (LayerScale); 1 = ReeFL's replacement, 0 = the backbone undisturbed
        self.gate = LayerScale(dim, gate_init)

    def forward(self, cls_features: torch.Tensor) -> torch.Tensor:
        """(batch, n, dim) CLS features of blocks 1..n -> (batch, n + 1, dim); index 0 is
        the meta output, index i the output at block i's position."""
        x = self.tokens(cls_features)
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(batch, seq) 1/0 -> (batch, 1, 1, seq) 0/-inf-ish, what BERT layers add to scores."""
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class EarlyExitClassifier(nn.Module):
    """A backbone run block by block with exits after ``exit_blocks``.

    ``forward(**batch)`` returns one logits tensor per exit up to ``max_exit`` (1-based),
    shallowest first. Text batches carry ``input_ids`` / ``attention_mask``, image
    batches ``pixel_values``; ``labels`` is ignored here (the losses are in this module's
    functions below, chosen by the method)."""

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        *,
        exit_blocks: Sequence[int],
        exit_kind: str,
        max_exit: int | None = None,
        ree_heads: int = 4,
        ree_attn_dim: int = 32,
        ree_mlp_ratio: float = 1.35,
        modulation: bool = True,
        pooling: str = "cls",
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling {pooling!r}: accepted {', '.join(POOLINGS)}")
        self.pooling = pooling
        if exit_kind not in EXIT_KINDS:
            raise ValueError(f"exit kind {exit_kind!r}: accepted {', '.join(EXIT_KINDS)}")
        self.backbone = backbone
        self.num_blocks = len(backbone_blocks(backbone))
        self.exit_blocks = exit_blocks_for(self.num_blocks, exit_blocks)
        self.max_exit = len(self.exit_blocks) if max_exit is None else max_exit
        if not 1 <= self.max_exit <= len(self.exit_blocks):
            raise ValueError(f"max exit {max_exit}: this model has exits 1..{len(self.exit_blocks)}")
        self.exit_kind = exit_kind
        self.modulation = modulation
        dim = backbone.config.hidden_size
        if exit_kind == "ree":
            # CLS features: gate 1, ReeFL's replacement; mean-pooled features of a
            # pretrained text encoder: gate 0, the backbone starts out undisturbed
            gate = 1.0 if pooling == "cls" else 0.0
            self.ree = ReeModule(dim, self.num_blocks, heads=ree_heads, attn_dim=ree_attn_dim, mlp_ratio=ree_mlp_ratio, gate_init=gate)
            self.head = ExitHead(dim, num_classes)
        else:
            self.heads = nn.ModuleList(ExitHead(dim, num_classes) for _ in self.exit_blocks)

    @property
    def blocks_run(self) -> int:
        return self.exit_blocks[self.max_exit - 1]

    def truncate(self, max_exit: int) -> EarlyExitClassifier:
        """Drop the blocks and heads past ``max_exit`` (in place): a shallow device then holds
        and runs only its part of the model."""
        if not 1 <= max_exit <= self.max_exit:
            raise ValueError(f"max exit {max_exit}: this model has exits 1..{self.max_exit}")
        self.max_exit = max_exit
        layers = backbone_blocks(self.backbone)
        while len(layers) > self.blocks_run:
            del layers[len(layers) - 1]
        if self.exit_kind == "per-exit":
            while len(self.heads) > max_exit:
                del self.heads[len(self.heads) - 1]
        return self

    def _embed(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if "pixel_values" in batch:
            return self.backbone.embeddings(batch["pixel_values"]), None
        hidden = self.backbone.embeddings(input_ids=batch["input_ids"])
        return hidden, _additive_mask(batch["attention_mask"], hidden.dtype)

    def _summary(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """A block's feature: its CLS token, or the mean over the (unmasked) tokens for
        encoders trained with mean pooling (all-MiniLM-L6-v2's CLS is nearly constant)."""
        if self.pooling == "cls":
            return hidden[:, 0]
        if attention_mask is None:
            return hidden.mean(1)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def forward(self, **batch: torch.Tensor) -> list[torch.Tensor]:
        hidden, mask = self._embed(batch)
        layers = backbone_blocks(self.backbone)
        logits, cls_so_far = [], []
        for block in range(self.blocks_run):
            hidden = layers[block](hidden, attention_mask=mask) if mask is not None else layers[block](hidden)
            if isinstance(hidden, tuple):  # older transformers return (hidden, ...)
                hidden = hidden[0]
            cls = self._summary(hidden, batch.get("attention_mask"))
            is_exit = (block + 1) in self.exit_blocks
            if self.exit_kind == "ree":
                cls_so_far.append(cls)
                out = self.ree(torch.stack(cls_so_far, dim=1))
                if is_exit:
                    logits.append(self.head(out[:, 0] + cls))
                if self.modulation and block + 1 < self.blocks_run:
                    # the module's update at this block's position goes into the CLS token:
                    # with CLS features this *is* the module's output (ReeFL's replacement);
                    # with mean-pooled features the CLS token keeps the state the
                    # pretrained blocks expect, plus the module's update
                    update = self.ree.gate(out[:, -1] - cls)
                    hidden = torch.cat([(hidden[:, 0] + update).unsqueeze(1), hidden[:, 1:]], dim=1)
            elif is_exit:
                logits.append(self.heads[len(logits)](cls))
        return logits

    def idle_parameters(self) -> set[str]:
        """Names of the parameters this model's forward does not use: the backbone's own
        final norm or pooler (the exits replace them), and ReeFL's gate when no
        modulation happens (a model of one block). DP-SGD must not train them: Opacus
        clips and noises every trainable parameter, and these have no gradient to clip."""
        used = ("backbone.embeddings.", "backbone.encoder.layer.", "backbone.layers.", "ree.", "head.", "heads.")
        idle = {n for n, _ in self.named_parameters() if not n.startswith(used)}
        if self.exit_kind == "ree" and (not self.modulation or self.blocks_run == 1):
            idle |= {n for n, _ in self.ree.gate.named_parameters(prefix="ree.gate")}
        return idle

    def required_exits(self) -> dict[str, int]:
        """{trainable parameter name: the smallest max exit of a model that holds it}."""
        return {n: required_exit(n, self.exit_blocks) for n, p in self.named_parameters() if p.requires_grad}

    def trainable_state(self) -> dict[str, np.ndarray]:
        return {n: p.detach().cpu().numpy().copy() for n, p in self.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def load_trainable_state(self, state: Mapping[str, np.ndarray]) -> None:
        params = dict(self.named_parameters())
        for name, value in state.items():
            if name not in params:
                raise KeyError(f"{name}: not a parameter of this model (exits 1..{self.max_exit})")
            if tuple(params[name].shape) != value.shape:
                raise ValueError(f"{name}: shape {value.shape}, the model has {tuple(params[name].shape)}")
            params[name].copy_(source_tensor(value))


def set_tuning(model: EarlyExitClassifier, tuning: str, *, lora_rank: int = 8, lora_alpha: float = 16.0, seed: int = 0) -> None:
    """What trains: ``full`` (every backbone parameter below the top), ``lora`` (peft LoRA
    on the attention's query and value projections, backbone frozen), ``frozen`` (only the
    exit modules). The exit modules always train."""
    if tuning not in TUNINGS:
        raise ValueError(f"tuning {tuning!r}: accepted {', '.join(TUNINGS)}")
    if tuning == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        torch.manual_seed(seed)  # every process builds the same initial adapter
        leaves = {n.rsplit(".", 1)[-1] for n, m in model.backbone.named_modules() if isinstance(m, nn.Linear)}
        targets = [t for t in _LORA_TARGETS if t in leaves]
        config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, target_modules=targets, lora_dropout=0.0)
        inject_adapter_in_model(config, model.backbone)
    for name, param in model.backbone.named_parameters():
        in_blocks = name.startswith(("embeddings.", "encoder.layer.", "layers."))
        param.requires_grad = in_blocks and (tuning == "full" or (tuning == "lora" and "lora_" in name))


# --- losses -------------------------------------------------------------------------------


def exit_cross_entropy(logits: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """(num exits,) cross-entropy of each exit."""
    return torch.stack([F.cross_entropy(z, labels) for z in logits])


def distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened distributions, teacher detached,
    scaled by T^2 (Hinton et al.) so its gradient does not shrink with T."""
    t = temperature
    target = F.log_softmax(teacher.detach() / t, dim=-1)
    return F.kl_div(F.log_softmax(student / t, dim=-1), target, log_target=True, reduction="batchmean") * t * t


def self_distillation_loss(logits: Sequence[torch.Tensor], teacher: int, temperature: float = 1.0) -> torch.Tensor:
    """ReeFL: every exit but the teacher learns from the teacher exit (detached)."""
    terms = [distillation(z, logits[teacher], temperature) for j, z in enumerate(logits) if j != teacher]
    return torch.stack(terms).sum() if terms else logits[0].new_zeros(())


def mutual_distillation_loss(logits: Sequence[torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """DepthFL: every exit learns from the mean of the other exits' KL (each detached)."""
    if len(logits) < 2:
        return logits[0].new_zeros(())
    terms = [
        torch.stack([distillation(z, other, temperature) for i, other in enumerate(logits) if i != j]).mean()
        for j, z in enumerate(logits)
    ]
    return torch.stack(terms).sum()


def update_loss_ema(ema: Sequence[float], losses: Sequence[float], decay: float) -> list[float]:
    """Per-exit exponential moving average of the loss; an exit seen for the first time
    (NaN in ``ema``) starts at its loss."""
    return [
        float(x) if math.isnan(m) else decay * float(m) + (1.0 - decay) * float(x)
        for m, x in zip(list(ema) + [math.nan] * (len(losses) - len(ema)), losses, strict=False)
    ]


Objective = Callable[..., tuple[torch.Tensor, torch.Tensor]]
"""A method's local loss: ``objective(logits, labels, *, teacher, distill_weight,
temperature) -> (loss to minimise, per-exit cross-entropy, detached)``. Each method's
is one small file of client_app/methods/, built from the pieces above."""


def train_early_exit(
    model: EarlyExitClassifier,
    task,
    data,
    *,
    objective: Objective,
    steps: int,
    batch_size: int,
    learning_rate: float,
    exit_learning_rate: float,
    seed: int,
    distill_weight: float = 0.0,
    temperature: float = 1.0,
    loss_ema: Sequence[float] = (),
    ema_decay: float = 0.9,
    private: DPSGD | None = None,
) -> dict:
    """``steps`` AdamW steps (ml/loop.py) on the model's trainable parameters (the exit
    modules at ``exit_learning_rate``) of the method's ``objective``. The teacher it is
    given (ReeFL distils from it; the others ignore it) is, at every step, the exit with
    the lowest moving-average loss so far (``loss_ema`` carries it across rounds; the
    deepest exit before any is known).

    ``private``: DP-SGD (ml/privacy.py). The teacher is then always the deepest exit:
    choosing it from un-noised losses would let the data steer training outside the
    guarantee (the moving average is left as it was).

    Returns {"loss": mean objective, "exit_losses": mean CE per exit, "loss_ema": the
    updated averages, "teacher": the last teacher (0-based), "ledger": under DP the
    spending including this round, else None}."""

    exit_names = ("ree.", "head.", "heads.")  # the gate (ree.gate) learns at the backbone rate, see ReeModule
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    is_exit = lambda n: n.startswith(exit_names) and not n.startswith("ree.gate.")  # noqa: E731
    groups = [
        {"params": [p for n, p in params if not is_exit(n)], "lr": learning_rate},
        {"params": [p for n, p in params if is_exit(n)], "lr": exit_learning_rate},
    ]
    groups = [g for g in groups if g["params"]]
    ema = list(loss_ema)[: model.max_exit]
    deepest = model.max_exit - 1
    adapt = private is None  # the teacher follows the losses: not under DP (docstring)
    exit_losses, teacher = [], deepest

    def step_loss(m: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        nonlocal ema, teacher
        batch = dict(batch)
        labels = batch.pop("labels")
        if adapt:
            known = [x for x in ema if not math.isnan(x)]
            teacher = int(np.nanargmin(ema)) if len(known) == model.max_exit else deepest
        loss, ce = objective(m(**batch), labels, distill_weight=distill_weight, teacher=teacher, temperature=temperature)
        exit_losses.append(ce.tolist())
        if adapt:  # the next step's teacher sees this step's losses
            ema = update_loss_ema(ema, exit_losses[-1], ema_decay)
        return loss

    trained = train(model, task, data, steps=steps, batch_size=batch_size, seed=seed, groups=groups, loss=step_loss, private=private)
    return {
        "loss": trained.loss,
        "exit_losses": [float(x) for x in np.mean(exit_losses, axis=0)] if exit_losses else [math.nan] * model.max_exit,
        "loss_ema": ema,
        "teacher": teacher,
        "ledger": trained.ledger,
    }


def build_model(
    task,
    *,
    exit_kind: str,
    exit_blocks: Sequence[int] = (),
    tuning: str = "lora",
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    ree_heads: int = 4,
    ree_attn_dim: int = 32,
    ree_mlp_ratio: float = 1.35,
    pooling: str = "auto",
    seed: int = 0,
    max_exit: int | None = None,
) -> EarlyExitClassifier:
    """The early-exit model of a task. Every process that builds it with the same seed gets
    the same initial weights (the server still sends what trains). ``pooling="auto"``:
    the mean over tokens for text (as the single-exit classifier, ml/model.py), CLS for
    images."""
    if pooling == "auto":
        pooling = "cls" if getattr(task, "name", "") == "image-classification" else "mean"
    torch.manual_seed(seed)
    model = EarlyExitClassifier(
        task.load_backbone(),
        task.num_labels,
        exit_blocks=exit_blocks,
        exit_kind=exit_kind,
        ree_heads=ree_heads,
        ree_attn_dim=ree_attn_dim,
        ree_mlp_ratio=ree_mlp_ratio,
        pooling=pooling,
    )
    set_tuning(model, tuning, lora_rank=lora_rank, lora_alpha=lora_alpha, seed=seed)
    if max_exit is not None:
        model.truncate(max_exit)
    return model.eval()


def model_from_config(task, cfg, *, exit_kind: str, max_exit: int | None = None) -> EarlyExitClassifier:
    """:func:`build_model` with the run config's ``early-exit.*`` and ``lora.*`` values."""
    ee = cfg.early_exit
    return build_model(
        task,
        exit_kind=exit_kind,
        exit_blocks=ee.exits,
        tuning=ee.tuning,
        lora_rank=cfg.lora.rank,
        lora_alpha=cfg.lora.alpha,
        ree_heads=ee.ree_heads,
        ree_attn_dim=ee.ree_attn_dim,
        ree_mlp_ratio=ee.ree_mlp_ratio,
        seed=cfg.train.seed,
        max_exit=max_exit,
    )


# --- evaluation ---------------------------------------------------------------------------


def exit_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """(exits, n, classes) softmax outputs -> accuracy per exit, their mean, and the
    accuracy of the ensemble (mean of the exits' probabilities)."""
    per_exit = (probs.argmax(-1) == labels[None]).mean(axis=1)
    out = {f"accuracy_exit{j + 1}": float(a) for j, a in enumerate(per_exit)}
    out["accuracy_mean"] = float(per_exit.mean())
    out["accuracy_ensemble"] = float((probs.mean(0).argmax(-1) == labels).mean())
    return out


def early_exit_decisions(probs: np.ndarray, labels: np.ndarray, exit_blocks: Sequence[int], threshold: float) -> tuple[float, float]:
    """Early-exit inference: each example leaves at the first exit whose top probability
    reaches ``threshold`` (else at the last). Returns (accuracy, mean blocks run).

    Exit j's output depends on blocks 1..exit_blocks[j] only, so deciding from one full
    pass gives the same answers as stopping there."""
    confident = probs.max(-1) >= threshold  # (exits, n)
    confident[-1] = True
    leave = confident.argmax(0)  # first confident exit per example
    predictions = probs[leave, np.arange(probs.shape[1])].argmax(-1)
    return float((predictions == labels).mean()), float(np.asarray(exit_blocks)[leave].mean())


@torch.no_grad()
def evaluate(model: EarlyExitClassifier, task, data, *, batch_size: int, thresholds: Sequence[float] = ()) -> dict[str, float]:
    """Accuracy per exit, mean over exits, ensemble, and for each confidence threshold the
    early-exit accuracy and the share of blocks run (``blocks_at_<t>``: 1.0 = every block)."""

    model.eval()
    probs, labels = [], []
    for start in range(0, len(data), batch_size):
        batch = to_device(task.batch(data, np.arange(start, min(start + batch_size, len(data)))), model)
        labels.append(batch.pop("labels").cpu().numpy())
        probs.append(torch.stack([z.softmax(-1) for z in model(**batch)]).cpu().numpy())
    p, y = np.concatenate(probs, axis=1), np.concatenate(labels)
    out = exit_metrics(p, y)
    for t in thresholds:
        accuracy, blocks = early_exit_decisions(p, y, model.exit_blocks[: model.max_exit], t)
        out[f"accuracy_at_{t:g}"] = accuracy
        out[f"blocks_at_{t:g}"] = blocks / model.num_blocks
    return out
