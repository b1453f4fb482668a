"""Hand-computed answers for displacement_jax.score.filtering."""

import numpy as np
import pytest

from displacement_jax.score import filtering

# Value v sits at position POS[v]; so the ascending order is exactly POS.
SCORES10 = [5.0, 3.0, 9.0, 1.0, 7.0, 0.0, 8.0, 2.0, 6.0, 4.0]
ORDER10 = [5, 3, 7, 1, 9, 0, 8, 4, 6, 2]


def test_sort_order_hand():
  np.testing.assert_array_equal(filtering.sort_order(SCORES10), ORDER10)


@pytest.mark.parametrize(
    "q, expected",
    [
        (0.0, [5, 3, 7, 1]),  # centre 0 -> start -2, clipped to 0: ranks 0..3
        (0.25, [5, 3, 7, 1]),  # centre round(2.25)=2 -> start 0: ranks 0..3
        (0.5, [1, 9, 0, 8]),  # centre round-half-up(4.5)=5 -> start 3: ranks 3..6
        (0.75, [0, 8, 4, 6]),  # centre round(6.75)=7 -> start 5: ranks 5..8
        (1.0, [8, 4, 6, 2]),  # centre 9 -> start 7, clipped to N-w=6: ranks 6..9
    ],
)
def test_quantile_window_n10_w4(q, expected):
  got = filtering.quantile_window(SCORES10, q, window=4)
  assert got.dtype == np.int64
  np.testing.assert_array_equal(got, expected)


def test_window_bounds_hand():
  assert filtering.window_bounds(10, 0.5, 4) == (3, 7)
  assert filtering.window_bounds(10, 0.5, 3) == (4, 7)  # odd window: centre 5 in the middle
  assert filtering.window_bounds(5000, 1.0, 512) == (4488, 5000)
  assert filtering.window_bounds(5000, 0.5, 512) == (2244, 2756)  # centre round(2499.5)=2500


def test_ties_are_stable():
  scores = [1.0, 0.0, 1.0, 0.0, 1.0]
  np.testing.assert_array_equal(filtering.sort_order(scores), [1, 3, 0, 2, 4])
  np.testing.assert_array_equal(filtering.lowest_k(scores, 3), [1, 3, 0])
  np.testing.assert_array_equal(filtering.quantile_window(scores, 1.0, 2), [2, 4])
  np.testing.assert_array_equal(filtering.quantile_window([2.0] * 6, 0.5, 2), [2, 3])


def test_small_n():
  np.testing.assert_array_equal(filtering.quantile_window([3.5], 0.5, 1), [0])
  np.testing.assert_array_equal(filtering.quantile_window([2.0, -1.0, 0.0], 0.0, 3), [1, 2, 0])
  np.testing.assert_array_equal(filtering.lowest_k([2.0, -1.0], 2), [1, 0])
  np.testing.assert_array_equal(filtering.lowest_fraction([2.0, -1.0], 0.1), [1])  # at least one


def test_lowest_k_and_fraction_hand():
  np.testing.assert_array_equal(filtering.lowest_k(SCORES10, 3), [5, 3, 7])
  np.testing.assert_array_equal(filtering.lowest_fraction(SCORES10, 0.25), [5, 3, 7])  # 2.5 -> 3
  np.testing.assert_array_equal(filtering.lowest_fraction(SCORES10, 1.0), ORDER10)
  assert filtering.fraction_to_k(370, 0.05) == 19  # paper: 19 of 370 SORRY-Bench rows
  assert filtering.fraction_to_k(10, 0.2) == 2


def test_infinite_scores_sort():
  np.testing.assert_array_equal(filtering.lowest_k([np.inf, 0.0, -np.inf], 2), [2, 1])


def test_select_dispatch():
  np.testing.assert_array_equal(filtering.select(SCORES10, "none"), np.arange(10))
  np.testing.assert_array_equal(filtering.select(SCORES10, "lowest_k", k=2), [5, 3])
  np.testing.assert_array_equal(filtering.select(SCORES10, "lowest_fraction", fraction=0.3), [5, 3, 7])
  np.testing.assert_array_equal(filtering.select(SCORES10, "quantile_window", q=0.75, window=4), [0, 8, 4, 6])


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: filtering.quantile_window(SCORES10, -0.1, 4), r"q must be in \[0, 1\]"),
        (lambda: filtering.quantile_window(SCORES10, 1.5, 4), r"q must be in \[0, 1\]"),
        (lambda: filtering.quantile_window(SCORES10, 0.5, 11), r"window=11 .* N=10"),
        (lambda: filtering.quantile_window(SCORES10, 0.5, 0), "window must be a positive integer"),
        (lambda: filtering.lowest_k([1.0, float("nan"), 2.0], 1), r"NaN at positions \[1\]"),
        (lambda: filtering.quantile_window([float("nan")] * 2, 0.5, 1), "NaN"),
        (lambda: filtering.lowest_k(SCORES10, 0), r"k must be in \[1, N=10\]"),
        (lambda: filtering.lowest_k(SCORES10, 11), r"k must be in \[1, N=10\]"),
        (lambda: filtering.lowest_fraction(SCORES10, 0.0), r"fraction must be in \(0, 1\]"),
        (lambda: filtering.lowest_fraction(SCORES10, 1.2), r"fraction must be in \(0, 1\]"),
        (lambda: filtering.lowest_k(np.zeros((2, 2)), 1), r"1-D, got shape \(2, 2\)"),
        (lambda: filtering.lowest_k([], 1), "empty"),
        (lambda: filtering.select(SCORES10, "highest"), "unknown filter mode 'highest'"),
        (lambda: filtering.select(SCORES10, "lowest_k"), "needs filter.k"),
    ],
)
def test_bad_input(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_audit_scores_drop_the_pairs_predicted_to_fall_most():
  """Predicted changes of ln pi(y+) (nats) -> risk = minus the change; drop_highest_k drops the k biggest falls."""
  along, own, others = [0.2, -1.0, -0.1, 0.0], [0.3, 0.1, -0.5, 0.0], [-0.1, -1.1, 0.4, 0.0]
  scores = filtering.audit_scores(along, own, others)
  np.testing.assert_array_equal(scores["audit_fall"], [-0.2, 1.0, 0.1, -0.0])
  np.testing.assert_array_equal(filtering.drop_highest_k(scores["audit_fall"], 1), [0, 3, 2])  # row 1 falls most
  np.testing.assert_array_equal(filtering.drop_highest_k(scores["audit_own_fall"], 1), [0, 1, 3])  # own: row 2
  np.testing.assert_array_equal(filtering.drop_highest_k(scores["audit_others_fall"], 2), [2, 3])  # others: 1, 0
  assert set(filtering.audit_scores(along)) == {"audit_fall"}
  with pytest.raises(ValueError, match="NaN"):
    filtering.audit_scores([0.0, float("nan")])
