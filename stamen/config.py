"""The run configuration: every default lives in pyproject.toml's [tool.flwr.app.config].

Flower hands the ServerApp and every ClientApp the same flat ``run_config`` mapping
(``"lora.rank": 8``, ...). It is parsed here, once, into frozen dataclasses. A bad value
raises :class:`ConfigError` naming the key, the value and what is accepted, before any
training starts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

CENTRAL_DP_STRATEGIES = ("flora", "fedit", "flexlora")  # their aggregate is a (uniform) average of per-node updates
LORA_STRATEGIES = ("flora", "fedit", "hetlora", "flexlora", "fedspine")
EARLY_EXIT_STRATEGIES = ("reefl", "depthfl", "inclusivefl", "exclusivefl")
STRATEGIES = LORA_STRATEGIES + EARLY_EXIT_STRATEGIES
TASKS = ("text-classification", "causal-lm", "image-classification")
DATASETS = ("bbc-news", "digits")
PARTITIONERS = ("dirichlet", "iid")  # flwr-datasets partitioners of the training split (ml/data.py)
DATA_TASKS = {"bbc-news": ("text-classification", "causal-lm"), "digits": ("image-classification",)}
DEVICE_CLASSES = ("raspberry-pi", "jetson", "nvidia-gpu", "cpu")


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the key and the fix."""


@dataclass(frozen=True)
class StrategyConfig:
    name: str
    num_rounds: int
    fraction_train: float
    min_nodes: int
    min_replies: int  # a round with fewer replies without an error fails the run (server_app/quorum.py)
    round_timeout: float
    query_timeout: float
    poll_interval: float  # seconds between the ServerApp's pulls for replies (Flower's: 3)


@dataclass(frozen=True)
class RobustConfig:
    """What one node's reply can do to the aggregate (strategies/bounds.py, docs/robustness.md)."""

    norm_multiple: float = 3.0  # an update's norm is bounded by this x the round's median; 0: off
    norm_cap: float = 0.0  # and by this absolute norm; 0: no cap
    over_bound: str = "clip"  # "clip" | "drop": an update over the bound
    max_weight_share: float = 0.5  # a node weighs at most this share of the round's total; 1: off
    weights: str = "examples"  # "examples" (bounded claims) | "equal"

    def __post_init__(self) -> None:
        if self.over_bound not in ("clip", "drop") or self.weights not in ("examples", "equal"):
            raise ConfigError(f"robust: over-bound {self.over_bound!r} must be clip or drop, weights {self.weights!r} examples or equal")
        if not (self.norm_multiple == 0 or self.norm_multiple >= 1):
            raise ConfigError(f"robust.norm-multiple = {self.norm_multiple}: 0 (off) or at least 1")


@dataclass(frozen=True)
class ModelConfig:
    path: str
    task: str
    max_seq_len: int
    cache_dir: str


@dataclass(frozen=True)
class LoraConfig:
    rank: int
    alpha: float
    target_modules: tuple[str, ...]  # empty: the architecture's default
    rank_by_class: Mapping[str, int]
    rank_by_partition: tuple[int, ...] = ()  # cycled over partition ids; for simulation, where node-config is bare
    max_rank: int = 64  # a node whose rank would be larger is left out of the run (server_app/profiles.py)

    def rank_for(self, device_class: str, partition_id: int | None = None) -> int:
        """The LoRA rank a node trains with: by partition when ``lora.rank-by-partition``
        is set, else by device class, else ``lora.rank``."""
        if self.rank_by_partition and partition_id is not None:
            return self.rank_by_partition[partition_id % len(self.rank_by_partition)]
        return self.rank_by_class.get(device_class, self.rank)


@dataclass(frozen=True)
class HetLoRAConfig:
    tail_penalty: float
    tail_fraction: float
    prune_threshold: float
    aggregation: str = "zero-pad"  # "zero-pad" (the paper's) | "renormalized": strategies/hetlora.py


@dataclass(frozen=True)
class FedSpineConfig:
    """Pruning-ratio bandits (strategy.name = "fedspine"): docs/pruning.md."""

    ratios: tuple[float, ...]  # arms: every (ratio, rank) pair
    ranks: tuple[int, ...]
    gamma: float  # the bandit's discount per update (1 = UCB1)
    exploration: float  # UCB's exploration weight
    time_weight: float  # how much a round time above the median costs in the reward
    state_file: str  # a bandit_state.json of an earlier run to resume from; "" = start fresh


@dataclass(frozen=True)
class DPConfig:
    """Differential privacy (docs/privacy.md). ``local``: DP-SGD with Opacus on every node;
    ``central``: the server clips each node's update and noises the aggregate."""

    mode: str  # off | local | central
    noise_multiplier: float  # local: DP-SGD's; central: the Gaussian mechanism's on the aggregate; 0 = from epsilon (local)
    max_grad_norm: float  # local: per-example gradient clipping norm
    clipping_norm: float  # central: per-node update clipping norm
    epsilon: float  # local: the target (noise derived for the planned rounds) or, with a noise multiplier, the budget; 0 = none
    delta: float

    @property
    def local(self) -> bool:
        return self.mode == "local"

    @property
    def central(self) -> bool:
        return self.mode == "central"


@dataclass(frozen=True)
class EarlyExitConfig:
    """The early-exit strategies (reefl, depthfl, inclusivefl, exclusivefl): docs/early-exit.md."""

    exits: tuple[int, ...]  # blocks (1-based) that end in an exit; () = 4 spread evenly
    tuning: str  # full | lora | frozen: what of the backbone trains
    exit_by_class: Mapping[str, int]  # device class -> deepest exit the node trains
    exit_by_partition: tuple[int, ...]  # cycled over partition ids; wins over exit-by-class
    distill_weight: float  # ReeFL self-distillation / DepthFL mutual distillation weight
    distill_rampup_rounds: int  # the weight grows linearly over this many rounds
    distill_temperature: float
    loss_ema: float  # decay of each exit's loss moving average (ReeFL picks its teacher by it)
    ree_heads: int
    ree_attn_dim: int
    ree_mlp_ratio: float
    thresholds: tuple[float, ...]  # confidence thresholds of the early-exit inference report

    def exit_for(self, device_class: str, partition_id: int | None, num_exits: int) -> int:
        """The deepest exit a node trains: by partition when ``early-exit.exit-by-partition``
        is set, else by device class, else the full depth."""
        if self.exit_by_partition and partition_id is not None:
            chosen = self.exit_by_partition[partition_id % len(self.exit_by_partition)]
        else:
            chosen = self.exit_by_class.get(device_class, num_exits)
        return min(chosen, num_exits)


@dataclass(frozen=True)
class TrainConfig:
    local_steps: int
    batch_size: int
    learning_rate: float
    head_learning_rate: float
    seed: int


@dataclass(frozen=True)
class DataConfig:
    name: str
    dirichlet_alpha: float
    test_fraction: float
    seed: int
    partitioner: str = "dirichlet"  # dirichlet | iid (flwr-datasets; ml/data.py)
    min_partition_size: int = 10  # fewest examples a node may get (at most half a fair share)


@dataclass(frozen=True)
class EvalConfig:
    max_examples: int  # 0: the whole held-out split
    batch_size: int


@dataclass(frozen=True)
class OutputConfig:
    dir: str


@dataclass(frozen=True)
class CheckpointConfig:
    """Per-round checkpoints, resume and Hugging Face exports (docs/checkpoints.md)."""

    keep: int = 2  # the last K round checkpoints are kept (and the best round's)
    resume_from: str = ""  # a run directory: continue that run from its last complete round
    export_every_round: bool = False  # also write rounds/<N>/model (and adapter) after every round


@dataclass(frozen=True)
class SimulationConfig:
    """The simulated clock of a simulated fleet (measurements/clock.py, docs/scale.md)."""

    latency_model: str = ""  # a `stamen calibrate` file; "" = the host's wall clock
    fleet: str = ""  # "device[@network]=count ...", by partition id
    network: str = "wifi"  # the network of a fleet entry that names none
    keep_global: bool = False  # simulated nodes keep the global weights as real ones do (small fleets: their downlinks match)


@dataclass(frozen=True)
class MeasureConfig:
    """The instrumentation layer (measurements/). Also read on its own by the ClientApp
    mod, which serves any app: there a missing key takes the default below."""

    enabled: bool = True  # off: the mod and the resource sampler step aside
    sample_interval: float = 0.5  # seconds between two resource samples
    collector: str = "0.0.0.0:9400"  # where the ServerApp's telemetry collector listens; "" = none
    collector_certfile: str = ""  # TLS: the collector's certificate (PEM; the SuperLink's), on the SuperLink's machine
    collector_keyfile: str = ""  # and its private key; both empty: plaintext

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any], *, lenient: bool = False) -> MeasureConfig:
        r = _Reader(run_config)
        defaults = cls()

        def get(key: str, read, default):
            return read(key) if (key in run_config or not lenient) else default

        return cls(
            enabled=get("measure.enabled", r.boolean, defaults.enabled),
            sample_interval=get(
                "measure.sample-interval", lambda k: r.number(k, low=0.0, low_open=True), defaults.sample_interval
            ),
            collector=get("measure.collector", lambda k: r.text(k, allow_empty=True), defaults.collector),
            collector_certfile=get("measure.collector-certfile", lambda k: r.text(k, allow_empty=True), defaults.collector_certfile),
            collector_keyfile=get("measure.collector-keyfile", lambda k: r.text(k, allow_empty=True), defaults.collector_keyfile),
        )


@dataclass(frozen=True)
class StamenConfig:
    strategy: StrategyConfig
    model: ModelConfig
    lora: LoraConfig
    train: TrainConfig
    data: DataConfig
    eval: EvalConfig
    output: OutputConfig
    measure: MeasureConfig
    hetlora: HetLoRAConfig
    early_exit: EarlyExitConfig
    fedspine: FedSpineConfig
    dp: DPConfig
    robust: RobustConfig
    checkpoint: CheckpointConfig = CheckpointConfig()
    simulation: SimulationConfig = SimulationConfig()

    @property
    def is_early_exit(self) -> bool:
        return self.strategy.name in EARLY_EXIT_STRATEGIES

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> StamenConfig:
        """Parse and validate Flower's flat run config (``{"lora.rank": 8, ...}``)."""
        r = _Reader(run_config)
        cfg = cls(
            strategy=StrategyConfig(
                name=r.choice("strategy.name", STRATEGIES),
                num_rounds=r.integer("strategy.num-rounds", minimum=1),
                fraction_train=r.number("strategy.fraction-train", low=0.0, high=1.0, low_open=True),
                min_nodes=r.integer("strategy.min-nodes", minimum=1),
                min_replies=r.integer("strategy.min-replies", minimum=1),
                round_timeout=r.number("strategy.round-timeout", low=0.0, low_open=True),
                query_timeout=r.number("strategy.query-timeout", low=0.0, low_open=True),
                poll_interval=r.number("strategy.poll-interval", low=0.001, high=60.0),
            ),
            model=ModelConfig(
                path=r.text("model.path"),
                task=r.choice("model.task", TASKS),
                max_seq_len=r.integer("model.max-seq-len", minimum=8),
                cache_dir=r.text("model.cache-dir", allow_empty=True),
            ),
            lora=LoraConfig(
                rank=r.integer("lora.rank", minimum=1),
                alpha=r.number("lora.alpha", low=0.0, low_open=True),
                target_modules=r.names("lora.target-modules"),
                rank_by_class=r.rank_table("lora.rank-by-class"),
                rank_by_partition=r.rank_list("lora.rank-by-partition"),
                max_rank=r.integer("lora.max-rank", minimum=1),
            ),
            train=TrainConfig(
                local_steps=r.integer("train.local-steps", minimum=1),
                batch_size=r.integer("train.batch-size", minimum=1),
                learning_rate=r.number("train.learning-rate", low=0.0, low_open=True),
                head_learning_rate=r.number("train.head-learning-rate", low=0.0, low_open=True),
                seed=r.integer("train.seed", minimum=0),
            ),
            data=DataConfig(
                name=r.choice("data.name", DATASETS),
                dirichlet_alpha=r.number("data.dirichlet-alpha", low=0.0, low_open=True),
                test_fraction=r.number("data.test-fraction", low=0.0, high=1.0, low_open=True, high_open=True),
                seed=r.integer("data.seed", minimum=0),
                partitioner=r.choice("data.partitioner", PARTITIONERS),
                min_partition_size=r.integer("data.min-partition-size", minimum=1),
            ),
            eval=EvalConfig(
                max_examples=r.integer("eval.max-examples", minimum=0),
                batch_size=r.integer("eval.batch-size", minimum=1),
            ),
            output=OutputConfig(dir=r.text("output.dir")),
            measure=MeasureConfig.from_run_config(run_config),
            hetlora=HetLoRAConfig(
                tail_penalty=r.number("hetlora.tail-penalty", low=0.0),
                tail_fraction=r.number("hetlora.tail-fraction", low=0.0, high=1.0, low_open=True, high_open=True),
                prune_threshold=r.number("hetlora.prune-threshold", low=0.0, high=1.0),
                aggregation=r.choice("hetlora.aggregation", ("zero-pad", "renormalized")),
            ),
            early_exit=EarlyExitConfig(
                exits=r.rank_list("early-exit.exits"),
                tuning=r.choice("early-exit.tuning", ("full", "lora", "frozen")),
                exit_by_class=r.rank_table("early-exit.exit-by-class"),
                exit_by_partition=r.rank_list("early-exit.exit-by-partition"),
                distill_weight=r.number("early-exit.distill-weight", low=0.0),
                distill_rampup_rounds=r.integer("early-exit.distill-rampup-rounds", minimum=0),
                distill_temperature=r.number("early-exit.distill-temperature", low=0.0, low_open=True),
                loss_ema=r.number("early-exit.loss-ema", low=0.0, high=1.0, high_open=True),
                ree_heads=r.integer("early-exit.ree-heads", minimum=1),
                ree_attn_dim=r.integer("early-exit.ree-attn-dim", minimum=1),
                ree_mlp_ratio=r.number("early-exit.ree-mlp-ratio", low=0.0, low_open=True),
                thresholds=r.fractions("early-exit.thresholds"),
            ),
            fedspine=FedSpineConfig(
                ratios=r.ratio_list("fedspine.ratios"),
                ranks=r.rank_list("fedspine.ranks"),
                gamma=r.number("fedspine.gamma", low=0.0, high=1.0, low_open=True),
                exploration=r.number("fedspine.exploration", low=0.0),
                time_weight=r.number("fedspine.time-weight", low=0.0),
                state_file=r.text("fedspine.state-file", allow_empty=True),
            ),
            dp=DPConfig(
                mode=r.choice("dp.mode", ("off", "local", "central")),
                noise_multiplier=r.number("dp.noise-multiplier", low=0.0),
                max_grad_norm=r.number("dp.max-grad-norm", low=0.0, low_open=True),
                clipping_norm=r.number("dp.clipping-norm", low=0.0, low_open=True),
                epsilon=r.number("dp.epsilon", low=0.0),
                delta=r.number("dp.delta", low=0.0, high=1.0, low_open=True, high_open=True),
            ),
            robust=RobustConfig(
                norm_multiple=r.number("robust.norm-multiple", low=0.0),
                norm_cap=r.number("robust.norm-cap", low=0.0),
                over_bound=r.choice("robust.over-bound", ("clip", "drop")),
                max_weight_share=r.number("robust.max-weight-share", low=0.0, high=1.0, low_open=True),
                weights=r.choice("robust.weights", ("examples", "equal")),
            ),
            checkpoint=CheckpointConfig(
                keep=r.integer("checkpoint.keep", minimum=1),
                resume_from=r.text("checkpoint.resume-from", allow_empty=True),
                export_every_round=r.boolean("checkpoint.export-every-round"),
            ),
            simulation=SimulationConfig(
                latency_model=r.text("simulation.latency-model", allow_empty=True),
                fleet=r.text("simulation.fleet", allow_empty=True),
                network=r.text("simulation.network"),
                keep_global=r.boolean("simulation.keep-global"),
            ),
        )
        if bool(cfg.simulation.latency_model) != bool(cfg.simulation.fleet):
            raise ConfigError("simulation.latency-model and simulation.fleet go together: the clock needs a model and a fleet to time")
        if cfg.strategy.name == "fedspine" and not (cfg.fedspine.ratios and cfg.fedspine.ranks):
            raise ConfigError("strategy.name = 'fedspine' needs fedspine.ratios and fedspine.ranks, e.g. '0 0.2 0.5' and '4 8'")
        if cfg.model.task not in DATA_TASKS[cfg.data.name]:
            raise ConfigError(
                f"data.name = {cfg.data.name!r} does not fit model.task = {cfg.model.task!r}; "
                f"it fits: {', '.join(DATA_TASKS[cfg.data.name])}"
            )
        if cfg.model.task == "image-classification" and not cfg.is_early_exit:
            raise ConfigError(
                f"model.task = 'image-classification' needs an early-exit strategy ({', '.join(EARLY_EXIT_STRATEGIES)}), "
                f"not strategy.name = {cfg.strategy.name!r}"
            )
        if cfg.is_early_exit and cfg.model.task == "causal-lm":
            raise ConfigError(f"strategy.name = {cfg.strategy.name!r} classifies: use model.task text-classification or image-classification")
        if cfg.early_exit.ree_attn_dim % cfg.early_exit.ree_heads:
            raise ConfigError(
                f"early-exit.ree-attn-dim = {cfg.early_exit.ree_attn_dim} must be a multiple of "
                f"early-exit.ree-heads = {cfg.early_exit.ree_heads}"
            )
        if cfg.lora.rank > cfg.lora.max_rank:
            raise ConfigError(f"lora.rank = {cfg.lora.rank} is above lora.max-rank = {cfg.lora.max_rank}")
        _check_dp(cfg)
        r.mark_used(k for k in run_config if k.startswith("measure."))
        r.reject_unknown()
        return cfg

    def as_flat_dict(self) -> dict[str, Any]:
        """The resolved configuration, for the run directory."""
        out: dict[str, Any] = {}
        for section in dataclasses.fields(self):
            for field in dataclasses.fields(getattr(self, section.name)):
                value = getattr(getattr(self, section.name), field.name)
                if isinstance(value, tuple):
                    value = list(value)
                elif isinstance(value, Mapping):
                    value = dict(value)
                out[f"{section.name}.{field.name.replace('_', '-')}"] = value
        return out


def _check_dp(cfg: StamenConfig) -> None:
    """What a DP mode needs, and what it cannot serve (docs/privacy.md says why)."""
    dp, name = cfg.dp, cfg.strategy.name
    if dp.local:
        if dp.noise_multiplier == 0 and dp.epsilon == 0:
            raise ConfigError("dp.mode = 'local' needs dp.noise-multiplier > 0 or a target dp.epsilon > 0")
    if dp.central:
        if name not in CENTRAL_DP_STRATEGIES:
            raise ConfigError(
                f"dp.mode = 'central' serves {', '.join(CENTRAL_DP_STRATEGIES)}, not strategy.name = {name!r}: "
                "its aggregate is not an average of per-node updates, so clipping a node's update does not bound "
                "its influence (docs/privacy.md)"
            )
        if dp.noise_multiplier == 0:
            raise ConfigError("dp.mode = 'central' needs dp.noise-multiplier > 0")


class _Reader:
    """Reads typed values out of the flat mapping and remembers which keys it used."""

    def __init__(self, raw: Mapping[str, Any]) -> None:
        self._raw = dict(raw)
        self._used: set[str] = set()

    def _get(self, key: str) -> Any:
        self._used.add(key)
        if key not in self._raw:
            raise ConfigError(
                f"missing config key '{key}': set it in [tool.flwr.app.config] of pyproject.toml "
                f"or with `flwr run --run-config '{key}=...'`"
            )
        return self._raw[key]

    def mark_used(self, keys) -> None:
        self._used.update(keys)

    def boolean(self, key: str) -> bool:
        value = self._get(key)
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise ConfigError(f"{key} = {value!r}: must be true or false")

    def choice(self, key: str, accepted: tuple[str, ...]) -> str:
        value = self._get(key)
        if value not in accepted:
            raise ConfigError(f"{key} = {value!r} is not known; accepted values: {', '.join(accepted)}")
        return value

    def integer(self, key: str, *, minimum: int) -> int:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{key} = {value!r}: must be an integer >= {minimum}")
        return value

    def number(
        self,
        key: str,
        *,
        low: float | None = None,
        high: float | None = None,
        low_open: bool = False,
        high_open: bool = False,
    ) -> float:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} = {value!r}: must be a number")
        value = float(value)
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            lo = "" if low is None else f"{'(' if low_open else '['}{low}"
            hi = "" if high is None else f"{high}{')' if high_open else ']'}"
            raise ConfigError(f"{key} = {value!r}: must lie in {lo or '(-inf'}, {hi or 'inf)'}")
        return value

    def text(self, key: str, *, allow_empty: bool = False) -> str:
        value = self._get(key)
        if not isinstance(value, str) or (not allow_empty and not value.strip()):
            raise ConfigError(f"{key} = {value!r}: must be a non-empty string")
        return value.strip()

    def names(self, key: str) -> tuple[str, ...]:
        """A comma- or space-separated list of module names; "auto" means the default."""
        value = self.text(key)
        if value == "auto":
            return ()
        return tuple(n for n in value.replace(",", " ").split() if n)

    def rank_table(self, key: str) -> dict[str, int]:
        """``"raspberry-pi=4 jetson=8"`` -> {"raspberry-pi": 4, "jetson": 8}."""
        value = self.text(key, allow_empty=True)
        table: dict[str, int] = {}
        for item in value.replace(",", " ").split():
            cls, sep, rank = item.partition("=")
            if not sep or cls not in DEVICE_CLASSES or not rank.isdigit() or int(rank) < 1:
                raise ConfigError(
                    f"{key}: cannot read {item!r}; write CLASS=N pairs with a positive N and "
                    f"CLASS one of {', '.join(DEVICE_CLASSES)}, e.g. 'raspberry-pi=4 jetson=8'"
                )
            table[cls] = int(rank)
        return table

    def rank_list(self, key: str) -> tuple[int, ...]:
        """``"4 8 16 32"`` -> (4, 8, 16, 32); "" -> ()."""
        value = self.text(key, allow_empty=True)
        items = value.replace(",", " ").split()
        if not all(i.isdigit() and int(i) >= 1 for i in items):
            raise ConfigError(f"{key} = {value!r}: write positive integers separated by spaces, e.g. '4 8 16 32'")
        return tuple(int(i) for i in items)

    def fractions(self, key: str) -> tuple[float, ...]:
        """``"0.5 0.9 0.99"`` -> (0.5, 0.9, 0.99), each in (0, 1]."""
        return self._unit_floats(key, lambda x: 0.0 < x <= 1.0, "numbers in (0, 1]", "0.5 0.9 0.99")

    def ratio_list(self, key: str) -> tuple[float, ...]:
        """``"0 0.1 0.5"`` -> (0.0, 0.1, 0.5), each in [0, 1)."""
        return self._unit_floats(key, lambda x: 0.0 <= x < 1.0, "ratios in [0, 1)", "0 0.1 0.2 0.3 0.5")

    def _unit_floats(self, key: str, accepted, what: str, example: str) -> tuple[float, ...]:
        value = self.text(key, allow_empty=True)
        try:
            items = tuple(float(i) for i in value.replace(",", " ").split())
        except ValueError:
            items = (math.nan,)
        if not all(accepted(i) for i in items):
            raise ConfigError(f"{key} = {value!r}: write {what} separated by spaces, e.g. '{example}'")
        return items

    def reject_unknown(self) -> None:
        unknown = sorted(set(self._raw) - self._used)
        if unknown:
            import difflib

            hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, sorted(self._used), n=1)) else k for k in unknown]
            raise ConfigError(f"unknown config keys: {', '.join(hints)}; the keys are those of [tool.flwr.app.config] in pyproject.toml")
