"""FedIT, HetLoRA and FlexLoRA math on tiny hand-checkable arrays, and the property that
separates them from FLoRA: averaging factors adds cross terms, stacking does not."""

import numpy as np
import pytest

from stamen import lora_math
from strategies import fedit, flexlora, hetlora
from strategies.flora import stack_lora
from strategies.lora_records import ClientLoRA


def weighted_sum_of_products(updates, module):
    total = sum(u.num_examples for u in updates)
    return sum((u.num_examples / total) * u.scaling * (u.factors[module][1] @ u.factors[module][0]) for u in updates)


# --- FedIT --------------------------------------------------------------------------
def test_fedit_averages_each_factor_by_hand():
    a1, b1 = np.array([[1.0, 0.0]]), np.array([[2.0], [0.0]])
    a2, b2 = np.array([[0.0, 1.0]]), np.array([[0.0], [4.0]])
    avg = fedit.average_factors([ClientLoRA({"m": (a1, b1)}, 1, 1.0), ClientLoRA({"m": (a2, b2)}, 3, 1.0)])
    a, b = avg["m"]
    np.testing.assert_allclose(a, [[0.25, 0.75]])
    np.testing.assert_allclose(b, [[0.5], [3.0]])


def test_fedit_product_has_cross_terms_flora_does_not():
    # same two clients: FedIT's B A = (p1 B1 + p2 B2)(p1 A1 + p2 A2) = sum p_k^2 B_k A_k + cross terms
    a1, b1 = np.array([[1.0, 0.0]]), np.array([[2.0], [0.0]])
    a2, b2 = np.array([[0.0, 1.0]]), np.array([[0.0], [4.0]])
    updates = [ClientLoRA({"m": (a1, b1)}, 1, 1.0), ClientLoRA({"m": (a2, b2)}, 3, 1.0)]
    exact = weighted_sum_of_products(updates, "m")  # 1/4 [[2,0],[0,0]] + 3/4 [[0,0],[0,4]]
    np.testing.assert_allclose(exact, [[0.5, 0.0], [0.0, 3.0]])
    a, b = fedit.average_factors(updates)["m"]
    np.testing.assert_allclose(b @ a, [[0.125, 0.375], [0.75, 2.25]])  # [[.5],[3]] @ [[.25,.75]]
    cross = b @ a - exact
    assert np.abs(cross).max() > 0.3
    sa, sb = stack_lora(updates)["m"]
    np.testing.assert_allclose(sb @ sa, exact, atol=1e-12)


def test_fedit_cross_terms_on_random_clients():
    rng = np.random.default_rng(0)
    updates = [ClientLoRA({"m": (rng.normal(size=(4, 6)), rng.normal(size=(5, 4)))}, n, 2.0) for n in (10, 20, 30)]
    exact = weighted_sum_of_products(updates, "m")
    a, b = fedit.average_factors(updates)["m"]
    assert np.linalg.norm(2.0 * b @ a - exact) > 0.1 * np.linalg.norm(exact)
    sa, sb = stack_lora(updates)["m"]
    np.testing.assert_allclose(sb @ sa, exact, atol=1e-10)


def test_fedit_refuses_mixed_ranks():
    rng = np.random.default_rng(1)
    u1 = ClientLoRA({"m": (rng.normal(size=(2, 3)), rng.normal(size=(3, 2)))}, 1, 1.0)
    u2 = ClientLoRA({"m": (rng.normal(size=(4, 3)), rng.normal(size=(3, 4)))}, 1, 1.0)
    with pytest.raises(ValueError, match="one rank"):
        fedit.average_factors([u1, u2])


# --- HetLoRA ------------------------------------------------------------------------
def test_truncate_and_pad_by_hand():
    a = np.arange(6.0).reshape(3, 2)
    b = np.arange(6.0).reshape(2, 3)
    (ta, tb) = lora_math.truncate({"m": (a, b)}, 2)["m"]
    np.testing.assert_array_equal(ta, [[0, 1], [2, 3]])
    np.testing.assert_array_equal(tb, [[0, 1], [3, 4]])
    pa, pb = hetlora.pad(ta, tb, 3)
    np.testing.assert_array_equal(pa, [[0, 1], [2, 3], [0, 0]])
    np.testing.assert_array_equal(pb, [[0, 1, 0], [3, 4, 0]])
    with pytest.raises(ValueError):
        lora_math.truncate({"m": (a, b)}, 4)


def test_norm_weights_by_hand():
    # ||s B A||_F: client 1: 1*||[[2]]|| = 2, client 2: 2*||[[3]]|| = 6 -> 1/4, 3/4
    u1 = ClientLoRA({"m": (np.array([[1.0]]), np.array([[2.0]]))}, 100, 1.0)
    u2 = ClientLoRA({"m": (np.array([[1.0]]), np.array([[3.0]]))}, 1, 2.0)
    np.testing.assert_allclose(hetlora.norm_weights([u1, u2]), [0.25, 0.75])


def test_hetlora_aggregate_zero_pads_and_keeps_untrained_components():
    # global rank 3; client 1 holds rank 1 (weight 1/4), client 2 rank 2 (weight 3/4)
    prev_a, prev_b = np.full((3, 1), 9.0), np.full((1, 3), 9.0)
    u1 = ClientLoRA({"m": (np.array([[1.0]]), np.array([[2.0]]))}, 1, 1.0)  # ||B A|| = 2
    u2 = ClientLoRA({"m": (np.array([[2.0], [0.0]]), np.array([[3.0, 0.0]]))}, 1, 1.0)  # ||B A|| = 6
    a, b = hetlora.aggregate([u1, u2], {"m": (prev_a, prev_b)})["m"]
    # component 0: both clients, 1/4*1 + 3/4*2 = 1.75 (A), 1/4*2 + 3/4*3 = 2.75 (B)
    # component 1: only client 2 (renormalised to weight 1): A 0, B 0
    # component 2: nobody: the previous value 9
    np.testing.assert_allclose(a[:, 0], [1.75, 0.0, 9.0])
    np.testing.assert_allclose(b[0], [2.75, 0.0, 9.0])


@pytest.mark.parametrize("mode, component_1", [("zero-pad", (5 / 6 * 4.0, 5 / 6 * 1.0)), ("renormalized", (4.0, 1.0))])
def test_hetlora_a_component_only_some_clients_hold(mode, component_1):
    """Component 1 is non-zero and held by client 2 alone. ||B A||: client 1 2, client 2
    3*2 + 1*4 = 10, so the weights are 1/6 and 5/6. The paper's zero-padding gives
    5/6 x (A, B) for it; the renormalised variant divides by 5/6 and keeps (A, B)."""
    prev_a, prev_b = np.full((3, 1), 9.0), np.full((1, 3), 9.0)
    u1 = ClientLoRA({"m": (np.array([[1.0]]), np.array([[2.0]]))}, 1, 1.0)
    u2 = ClientLoRA({"m": (np.array([[2.0], [4.0]]), np.array([[3.0, 1.0]]))}, 1, 1.0)
    np.testing.assert_allclose(hetlora.norm_weights([u1, u2]), [1 / 6, 5 / 6])
    a, b = hetlora.aggregate([u1, u2], {"m": (prev_a, prev_b)}, mode=mode)["m"]
    np.testing.assert_allclose([a[0, 0], b[0, 0]], [1 / 6 * 1.0 + 5 / 6 * 2.0, 1 / 6 * 2.0 + 5 / 6 * 3.0])  # both hold it
    np.testing.assert_allclose([a[1, 0], b[0, 1]], component_1)
    np.testing.assert_allclose([a[2, 0], b[0, 2]], [9.0, 9.0])  # nobody holds it: kept
    with pytest.raises(ValueError, match="aggregation"):
        hetlora.aggregate([u1], {"m": (prev_a, prev_b)}, mode="mean")


def test_self_pruning_drops_a_small_tail_only():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(8, 5)), rng.normal(size=(4, 8))
    assert lora_math.self_prune_rank({"m": (a, b)}, rho=0.25, threshold=0.1) == 8  # tail as large as the rest
    a[-2:] *= 1e-3
    b[:, -2:] *= 1e-3
    assert lora_math.self_prune_rank({"m": (a, b)}, rho=0.25, threshold=0.1) == 6
    assert lora_math.self_prune_rank({"m": (a[:1], b[:, :1])}, rho=0.25, threshold=0.1) == 1  # never below 1


# --- FlexLoRA -----------------------------------------------------------------------
def test_full_delta_by_hand():
    u1 = ClientLoRA({"m": (np.array([[1.0, 0.0]]), np.array([[2.0], [0.0]]))}, 1, 2.0)
    u2 = ClientLoRA({"m": (np.array([[0.0, 1.0]]), np.array([[0.0], [4.0]]))}, 3, 1.0)
    np.testing.assert_allclose(flexlora.full_delta([u1, u2])["m"], [[1.0, 0.0], [0.0, 3.0]])


def test_svd_factors_split_sqrt_and_undo_the_scaling():
    delta = np.diag([4.0, 1.0, 0.25])
    a, b, s = flexlora.svd_factors(delta, rank=2, scaling=0.5)
    np.testing.assert_allclose(s, [4.0, 1.0, 0.25])
    np.testing.assert_allclose(0.5 * b @ a, np.diag([4.0, 1.0, 0.0]), atol=1e-12)  # the best rank-2 approximation
    # both factors carry sqrt(S)/sqrt(s): the same scale on each side
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), np.sqrt([4.0, 1.0]) / np.sqrt(0.5))
    np.testing.assert_allclose(np.linalg.norm(b, axis=0), np.sqrt([4.0, 1.0]) / np.sqrt(0.5))


def test_redistribution_is_exact_when_the_rank_suffices_and_optimal_otherwise():
    rng = np.random.default_rng(3)
    updates = [ClientLoRA({"m": (rng.normal(size=(r, 7)), rng.normal(size=(6, r)))}, n, 16.0 / r) for r, n in ((2, 5), (4, 9))]
    delta = flexlora.full_delta(updates)["m"]
    assert np.linalg.matrix_rank(delta) == 6  # 2 + 4 components
    a, b = flexlora.redistribute({"m": delta}, rank=6, scaling=16.0 / 6, dtype=np.float64)["m"]
    np.testing.assert_allclose((16.0 / 6) * b @ a, delta, atol=1e-10)
    a2, b2 = flexlora.redistribute({"m": delta}, rank=2, scaling=8.0, dtype=np.float64)["m"]
    s = np.linalg.svd(delta, compute_uv=False)
    assert np.linalg.norm(8.0 * b2 @ a2 - delta) == pytest.approx(np.sqrt(np.sum(s[2:] ** 2)))  # Eckart-Young


def test_low_rank_svd_equals_the_dense_one():
    rng = np.random.default_rng(5)
    b, a = rng.normal(size=(9, 3)), rng.normal(size=(3, 7))
    u, s, vt = flexlora.low_rank_svd(b, a)
    np.testing.assert_allclose(s, np.linalg.svd(b @ a, compute_uv=False)[:3], rtol=1e-10)
    np.testing.assert_allclose((u * s) @ vt, b @ a, atol=1e-10)
    np.testing.assert_allclose(u.T @ u, np.eye(3), atol=1e-10)  # orthonormal columns


def test_svd_factors_pad_when_the_matrix_is_smaller_than_the_rank():
    a, b, _ = flexlora.svd_factors(np.ones((2, 3)), rank=4, scaling=1.0)
    assert a.shape == (4, 3) and b.shape == (2, 4)
    np.testing.assert_allclose(b @ a, np.ones((2, 3)), atol=1e-12)


def test_components_the_delta_lacks_start_fresh_not_dead():
    """Two rank-2 clients, then a rank-16 node: the delta has 4 components. The other 12
    must not be zero in both factors (zero gradients: they would never train). They start
    as a fresh LoRA: A random, B = 0, so the product is still the delta."""
    rng = np.random.default_rng(4)
    updates = [ClientLoRA({"m": (rng.normal(size=(2, 10)), rng.normal(size=(8, 2)))}, 1, 1.0) for _ in range(2)]
    delta = flexlora.full_delta(updates)["m"]
    for svd in (np.linalg.svd(delta, full_matrices=False), flexlora.low_rank_svd(*flora_stack(updates))):  # dense: 8 values, 4 of them ~0
        a, b = flexlora.factors_from_svd(*svd, rank=16, scaling=0.5, rng=np.random.default_rng(0))
        assert a.shape == (16, 10) and b.shape == (8, 16)
        np.testing.assert_allclose(0.5 * b @ a, delta, atol=1e-10)
        np.testing.assert_array_equal(b[:, 4:], 0.0)  # the fresh ones add nothing yet
        assert np.all(np.abs(a[4:]) <= 1 / np.sqrt(10)) and np.all(np.linalg.norm(a[4:], axis=1) > 0.1)  # U(-1/sqrt(in), ..)
        # each component trains: d/dB of any loss is g A^T, non-zero in every column
        g = np.random.default_rng(1).normal(size=(8, 10))
        assert np.all(np.linalg.norm(g @ a.T, axis=0) > 1e-3)


def flora_stack(updates):
    from strategies.flora import stack_lora

    a, b = stack_lora(updates)["m"]
    return b, a
