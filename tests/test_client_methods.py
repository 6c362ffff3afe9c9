"""The device-side methods' registry (client_app/methods/): every strategy names a method
the device has, and an instruction that names none, or one the device lacks, is refused
with a reason. What each method's hooks do is tested through the train handler
(tests/test_client_train.py, tests/test_privacy.py, tests/test_early_exit.py)."""

import pytest
from flwr.app import ConfigRecord

from client_app.methods import METHODS, method_for, register
from client_app.methods.early_exit import EarlyExitMethod
from client_app.methods.lora import LoRAMethod
from stamen import keys
from strategies import STRATEGIES


def test_every_strategy_names_a_method_the_device_has():
    for name, cls in STRATEGIES.items():
        assert cls.client_method in METHODS, f"strategy {name}: no device-side method {cls.client_method!r}"
    # the early-exit strategies' nodes run an early-exit method, the others a LoRA one
    from strategies import EarlyExitStrategy

    for name, cls in STRATEGIES.items():
        family = EarlyExitMethod if issubclass(cls, EarlyExitStrategy) else LoRAMethod
        assert issubclass(METHODS[cls.client_method], family), name
    assert {"lora", "hetlora", "fedspine", "reefl", "depthfl", "inclusivefl", "exclusivefl"} <= set(METHODS)


def test_an_instruction_is_served_by_the_method_it_names():
    assert type(method_for(ConfigRecord({keys.METHOD: "hetlora"}))) is METHODS["hetlora"]
    with pytest.raises(ValueError, match="names no device-side method"):
        method_for(ConfigRecord({keys.SERVER_ROUND: 1}))
    with pytest.raises(ValueError, match="'nope'; this node has depthfl, exclusivefl, fedspine"):
        method_for(ConfigRecord({keys.METHOD: "nope"}))


def test_a_name_is_registered_once():
    with pytest.raises(ValueError, match="registered twice"):
        register("lora")(type("Other", (LoRAMethod,), {}))
    assert METHODS["lora"].__name__ == "PlainLoRA"
