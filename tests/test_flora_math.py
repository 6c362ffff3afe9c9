"""FLoRA stacking on tiny arrays: exactness, heterogeneous ranks, errors."""

import numpy as np
import pytest

from strategies.flora import merge_stacked, stack_lora
from strategies.lora_records import ClientLoRA


def client(rng, ranks_by_module, n, alpha=16.0, in_dim=5, out_dim=3):
    rank = next(iter(ranks_by_module.values()))
    factors = {m: (rng.normal(size=(r, in_dim)), rng.normal(size=(out_dim, r))) for m, r in ranks_by_module.items()}
    return ClientLoRA(factors=factors, num_examples=n, scaling=alpha / rank)


def weighted_sum_of_products(updates, module):
    total = sum(u.num_examples for u in updates)
    return sum((u.num_examples / total) * u.scaling * (u.factors[module][1] @ u.factors[module][0]) for u in updates)


def test_hand_checked_two_clients():
    # client 1: rank 1, n=1, s=2; client 2: rank 2, n=3, s=1  -> p = 1/4, 3/4
    a1, b1 = np.array([[1.0, 0.0]]), np.array([[2.0], [0.0]])
    a2, b2 = np.array([[0.0, 1.0], [1.0, 1.0]]), np.array([[1.0, 0.0], [0.0, 4.0]])
    stacked = stack_lora([ClientLoRA({"m": (a1, b1)}, 1, 2.0), ClientLoRA({"m": (a2, b2)}, 3, 1.0)])
    a, b = stacked["m"]
    np.testing.assert_allclose(a, [[0.5, 0.0], [0.0, 0.75], [0.75, 0.75]])  # rows p_k s_k A_k
    np.testing.assert_allclose(b, [[2.0, 1.0, 0.0], [0.0, 0.0, 4.0]])  # columns B_k
    # 1/4*2*B1A1 + 3/4*1*B2A2 = [[1,0],[0,0]] + [[0,0.75],[3,3]]
    np.testing.assert_allclose(b @ a, [[1.0, 0.75], [3.0, 3.0]])


def test_exact_with_heterogeneous_ranks():
    rng = np.random.default_rng(0)
    updates = [client(rng, {"q": r, "v": r}, n) for r, n in [(4, 10), (8, 30), (8, 5), (16, 55)]]
    stacked = stack_lora(updates)
    for module in ("q", "v"):
        a, b = stacked[module]
        assert a.shape == (36, 5) and b.shape == (3, 36)  # global rank = sum of ranks
        expected = weighted_sum_of_products(updates, module)
        rel = np.linalg.norm(b @ a - expected) / np.linalg.norm(expected)
        assert rel < 1e-6


def test_single_client_is_its_own_scaled_product():
    rng = np.random.default_rng(1)
    (u,) = updates = [client(rng, {"q": 4}, 7, alpha=8.0)]
    a, b = stack_lora(updates)["q"]
    np.testing.assert_allclose(b @ a, 2.0 * u.factors["q"][1] @ u.factors["q"][0], rtol=1e-12)


def test_partial_participation_weights_only_the_participants():
    rng = np.random.default_rng(2)
    everyone = [client(rng, {"q": r}, n) for r, n in [(4, 10), (8, 20), (16, 70)]]
    present = everyone[:2]  # the rank-16 node did not answer this round
    a, b = stack_lora(present)["q"]
    assert a.shape[0] == 12  # global rank counts only this round's participants
    np.testing.assert_allclose(b @ a, weighted_sum_of_products(present, "q"), rtol=1e-10)
    # p_k are shares of the participants: 10/30 and 20/30
    np.testing.assert_allclose(a[:4], (10 / 30) * present[0].scaling * present[0].factors["q"][0])


def test_module_mismatch_raises_clear_error():
    rng = np.random.default_rng(3)
    with pytest.raises(ValueError, match=r"client 1: modules differ.*v"):
        stack_lora([client(rng, {"q": 4}, 1), client(rng, {"v": 4}, 1)])


def test_shape_mismatch_raises_clear_error():
    rng = np.random.default_rng(4)
    with pytest.raises(ValueError, match=r"client 1, q: in/out dims"):
        stack_lora([client(rng, {"q": 4}, 1), client(rng, {"q": 4}, 1, in_dim=6)])
    bad = ClientLoRA({"q": (np.ones((4, 5)), np.ones((3, 2)))}, 1, 1.0)
    with pytest.raises(ValueError, match="not LoRA factors"):
        stack_lora([bad])


def test_empty_round_raises():
    with pytest.raises(ValueError, match="at least one"):
        stack_lora([])


def test_merge_adds_the_product_to_the_weight():
    w = {"q": np.zeros((2, 2), dtype=np.float32), "other": np.ones(3, dtype=np.float32)}
    merged = merge_stacked(w, {"q": (np.array([[1.0, 2.0]]), np.array([[1.0], [3.0]]))})
    np.testing.assert_allclose(merged["q"], [[1.0, 2.0], [3.0, 6.0]])
    assert merged["q"].dtype == np.float32
    assert merged["other"] is w["other"]
    with pytest.raises(ValueError, match="does not match"):
        merge_stacked(w, {"q": (np.ones((1, 3)), np.ones((2, 1)))})
    with pytest.raises(ValueError, match="not an adapted module"):
        merge_stacked(w, {"k": (np.ones((1, 2)), np.ones((2, 1)))})
