"""The run configuration: defaults parse, bad values name the key and the fix."""

import tomllib
from pathlib import Path

import pytest

from stamen.config import ConfigError, StamenConfig

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def defaults():
    return dict(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])


def test_defaults_parse(defaults):
    cfg = StamenConfig.from_run_config(defaults)
    assert cfg.strategy.name == "flora"
    assert cfg.lora.target_modules == ()  # "auto"
    assert cfg.lora.rank_for("raspberry-pi") == 4 and cfg.lora.rank_for("nvidia-gpu") == 16
    flat = cfg.as_flat_dict()
    assert flat["lora.rank"] == 8 and flat["data.dirichlet-alpha"] == 0.5


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("strategy.name", "fedsgd", r"strategy.name = 'fedsgd' is not known; accepted values: flora"),
        ("lora.rank", -4, r"lora.rank = -4: must be an integer >= 1"),
        ("lora.alpha", 0.0, r"lora.alpha = 0.0: must lie in \(0.0"),
        ("data.dirichlet-alpha", "x", r"data.dirichlet-alpha = 'x': must be a number"),
        ("model.path", "  ", r"model.path = '  ': must be a non-empty string"),
        ("lora.rank-by-class", "toaster=4", r"lora.rank-by-class: cannot read 'toaster=4'"),
        ("strategy.fraction-train", 1.5, r"strategy.fraction-train = 1.5: must lie in"),
    ],
)
def test_bad_values_name_the_key(defaults, key, value, message):
    with pytest.raises(ConfigError, match=message):
        StamenConfig.from_run_config({**defaults, key: value})


def test_missing_and_unknown_keys(defaults):
    del defaults["train.local-steps"]
    with pytest.raises(ConfigError, match="missing config key 'train.local-steps'"):
        StamenConfig.from_run_config(defaults)
    defaults["train.local-steps"] = 3
    with pytest.raises(ConfigError, match="unknown config keys: lora.rnak"):
        StamenConfig.from_run_config({**defaults, "lora.rnak": 3})


def test_target_modules_list(defaults):
    cfg = StamenConfig.from_run_config({**defaults, "lora.target-modules": "q_proj, v_proj"})
    assert cfg.lora.target_modules == ("q_proj", "v_proj")


def test_early_exit_section(defaults):
    cfg = StamenConfig.from_run_config({**defaults, "strategy.name": "reefl", "early-exit.exits": "2 4 6"})
    ee = cfg.early_exit
    assert cfg.is_early_exit and ee.exits == (2, 4, 6) and ee.thresholds[-1] == 0.99
    assert ee.exit_for("raspberry-pi", None, 4) == 1 and ee.exit_for("nvidia-gpu", None, 3) == 3  # capped at the model's exits
    by_partition = StamenConfig.from_run_config({**defaults, "early-exit.exit-by-partition": "1 2 3 4"}).early_exit
    assert [by_partition.exit_for("cpu", p, 4) for p in range(6)] == [1, 2, 3, 4, 1, 2]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"data.name": "digits"}, "data.name = 'digits' does not fit model.task = 'text-classification'"),
        ({"data.name": "digits", "model.task": "image-classification"}, "needs an early-exit strategy"),
        ({"strategy.name": "reefl", "model.task": "causal-lm"}, "classifies"),
        ({"early-exit.ree-attn-dim": 30}, "multiple of early-exit.ree-heads"),
        ({"early-exit.thresholds": "0.5 1.5"}, r"early-exit.thresholds = '0.5 1.5': write numbers in \(0, 1\]"),
        ({"early-exit.tuning": "half"}, "early-exit.tuning = 'half' is not known"),
    ],
)
def test_bad_early_exit_values_are_named(defaults, overrides, message):
    with pytest.raises(ConfigError, match=message):
        StamenConfig.from_run_config({**defaults, **overrides})


@pytest.mark.parametrize("overlay", sorted((ROOT / "conf").rglob("*.toml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_study_overlay_is_a_valid_config(defaults, overlay):
    """Each conf/ row, laid over the defaults, parses (a typo in a key fails here, not
    an hour into a study)."""
    values = tomllib.loads(overlay.read_text())
    cfg = StamenConfig.from_run_config({**defaults, **values})
    assert cfg.strategy.name == values.get("strategy.name", defaults["strategy.name"])
