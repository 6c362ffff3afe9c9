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
