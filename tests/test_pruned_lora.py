"""The aggregation rule for LoRA updates of differently pruned models, on arrays small
enough to check by hand."""

import numpy as np
import pytest

from strategies.pruned_lora import PrunedUpdate, full_delta, masked_average


def test_full_delta_places_the_kept_rows_and_columns():
    u = PrunedUpdate(a=np.array([[1.0, 2.0]]), b=np.array([[3.0], [4.0]]), scaling=0.5, weight=1, kept_rows=[0, 2], kept_cols=[1, 2])
    delta, mask = full_delta(u, (3, 3))
    np.testing.assert_allclose(delta, [[0, 1.5, 3.0], [0, 0, 0], [0, 2.0, 4.0]])
    np.testing.assert_allclose(mask, [[0, 1, 1], [0, 0, 0], [0, 1, 1]])


def test_a_pruned_unit_contributes_nothing_not_a_zero():
    # device 1 (weight 1) keeps both output rows; device 2 (weight 3) pruned row 1
    one = PrunedUpdate(a=np.array([[1.0, 1.0]]), b=np.array([[2.0], [4.0]]), scaling=1.0, weight=1)
    two = PrunedUpdate(a=np.array([[1.0, 1.0]]), b=np.array([[6.0]]), scaling=1.0, weight=3, kept_rows=[0])
    avg = masked_average([one, two], (2, 2))
    np.testing.assert_allclose(avg[0], [(2 + 3 * 6) / 4] * 2)  # both hold row 0: 1:3 weights
    np.testing.assert_allclose(avg[1], [4.0, 4.0])  # only device 1 holds row 1: its value, undiluted


def test_pruned_input_columns_and_unheld_entries():
    one = PrunedUpdate(a=np.array([[1.0]]), b=np.array([[2.0]]), scaling=1.0, weight=1, kept_rows=[0], kept_cols=[0])
    two = PrunedUpdate(a=np.array([[5.0]]), b=np.array([[1.0]]), scaling=1.0, weight=1, kept_rows=[0], kept_cols=[1])
    avg = masked_average([one, two], (2, 2))
    np.testing.assert_allclose(avg, [[2.0, 5.0], [0.0, 0.0]])  # row 1: nobody kept it, no update


def test_unpruned_updates_reduce_to_the_weighted_mean_of_products():
    rng = np.random.default_rng(0)
    ups = [PrunedUpdate(a=rng.normal(size=(2, 4)), b=rng.normal(size=(3, 2)), scaling=s, weight=w) for s, w in ((2.0, 1), (0.5, 3))]
    expected = sum(u.weight * u.scaling * u.b @ u.a for u in ups) / 4
    np.testing.assert_allclose(masked_average(ups, (3, 4)), expected)


def test_shapes_that_do_not_fit_are_refused():
    with pytest.raises(ValueError, match="do not fit"):
        full_delta(PrunedUpdate(a=np.ones((1, 2)), b=np.ones((3, 1)), scaling=1, weight=1, kept_rows=[0, 1]), (3, 2))
