"""A node's copy of the global weights follows the three downlink forms."""

import numpy as np
import pytest

from client_app.sync import OutOfSync, apply_downlink
from stamen import keys


def test_dense_replaces_everything():
    w = apply_downlink(None, -1, {"m.weight": np.ones((2, 2)), "head.bias": np.zeros(2)}, mode=keys.SYNC_DENSE, from_version=-1, to_version=3)
    assert list(w) == ["m"] and np.all(w["m"] == 1)


def test_stacked_merges_onto_the_held_version():
    held = {"m": np.zeros((2, 2))}
    down = {"m" + keys.LORA_A: np.array([[1.0, 2.0]]), "m" + keys.LORA_B: np.array([[1.0], [0.0]])}
    w = apply_downlink(held, 2, down, mode=keys.SYNC_STACKED, from_version=2, to_version=3)
    np.testing.assert_allclose(w["m"], [[1.0, 2.0], [0.0, 0.0]])
    with pytest.raises(OutOfSync, match="from version 2, node holds 1"):
        apply_downlink(held, 1, down, mode=keys.SYNC_STACKED, from_version=2, to_version=3)


def test_current_requires_the_same_version():
    held = {"m": np.ones((1, 1))}
    assert apply_downlink(held, 3, {}, mode=keys.SYNC_CURRENT, from_version=3, to_version=3)["m"][0, 0] == 1
    with pytest.raises(OutOfSync):
        apply_downlink(None, -1, {}, mode=keys.SYNC_CURRENT, from_version=3, to_version=3)
