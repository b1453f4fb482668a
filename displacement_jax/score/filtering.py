"""Select training subsets by a per-example score (CHES, LN-CHES, edit distance, ...).

All selectors sort the scores ascending with a *stable* sort (ties keep dataset order) and return
the selected positions into `scores` as an int64 array, ordered by ascending score. `lowest_*` keep the safest
rows; `drop_highest_*` drop the riskiest (highest-score) rows and keep the rest, so
`drop_highest_fraction=0.1` keeps N - round(0.1 N) rows.

Quantile windows follow the paper's Section 5 protocol: sort by the measure ascending and take the
`window`-sample window centred at `round(q * (N - 1))`, shifted (not truncated) so that it stays inside
`[0, N)`. `round` is round-half-up (`floor(x + 0.5)`), so q = 0.5 with N = 10 centres at 5, not 4.
For an even window the centre is the element just after the middle: indices `[c - w//2, c - w//2 + w)`.

The audit's measures (`audit_scores`, used by `python -m displacement_jax.audit` with `audit.filter`) score a pair
by how far the displacement audit predicts its ln pi(y+) to fall (higher = riskier, as CHES), so the
`drop_highest_*` modes drop the pairs predicted to fall most: by its own update, by the other pairs' updates, or
in all (the model at theta0 + D).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

MODES = ("none", "lowest_k", "lowest_fraction", "drop_highest_k", "drop_highest_fraction", "quantile_window")
AUDIT_MEASURES = ("audit_fall", "audit_own_fall", "audit_others_fall")


def _as_scores(scores: Sequence[float] | np.ndarray) -> np.ndarray:
  """Validate scores: a non-empty 1-D array of finite-or-inf floats without NaN."""
  arr = np.asarray(scores)
  if arr.ndim != 1:
    raise ValueError(f"scores must be 1-D, got shape {arr.shape}")
  if arr.size == 0:
    raise ValueError("scores is empty: nothing to select from")
  if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
    raise ValueError(f"scores must be numeric, got dtype {arr.dtype}")
  arr = arr.astype(np.float64)
  nan_at = np.flatnonzero(np.isnan(arr))
  if nan_at.size:
    raise ValueError(
        f"scores contain NaN at positions {nan_at[:10].tolist()}"
        f"{' ...' if nan_at.size > 10 else ''} ({nan_at.size} in all); fix the scoring before filtering"
    )
  return arr


def sort_order(scores: Sequence[float] | np.ndarray) -> np.ndarray:
  """Positions of `scores` sorted ascending; ties keep their original (dataset) order."""
  return np.argsort(_as_scores(scores), kind="stable").astype(np.int64)


def lowest_k(scores: Sequence[float] | np.ndarray, k: int) -> np.ndarray:
  """Positions of the `k` lowest scores (1 <= k <= N), ascending by score, stable on ties."""
  order = sort_order(scores)
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
    raise ValueError(f"k must be an integer, got {k!r}")
  if not 1 <= k <= order.size:
    raise ValueError(f"k must be in [1, N={order.size}], got k={k}")
  return order[:k]


def fraction_to_k(n: int, fraction: float) -> int:
  """Number of rows kept by `lowest_fraction`: round-half-up(fraction * n), at least 1.

  E.g. 5% of 370 rows -> 19 (the paper's SORRY-Bench filter)."""
  if (
      not isinstance(fraction, (int, float, np.floating))
      or isinstance(fraction, bool)
      or not (0.0 < float(fraction) <= 1.0)
  ):
    raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
  # The 1e-9 guards against 0.05 * 370 = 18.499999... style float error.
  return max(1, min(n, int(math.floor(float(fraction) * n + 0.5 + 1e-9))))


def lowest_fraction(scores: Sequence[float] | np.ndarray, fraction: float) -> np.ndarray:
  """Positions of the lowest `fraction` of scores (see `fraction_to_k`), ascending, stable on ties."""
  order = sort_order(scores)
  return order[: fraction_to_k(order.size, fraction)]


def drop_highest_k(scores: Sequence[float] | np.ndarray, k: int) -> np.ndarray:
  """Positions of every score but the `k` highest (0 <= k < N), ascending by score, stable on ties."""
  order = sort_order(scores)
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
    raise ValueError(f"k must be an integer, got {k!r}")
  if not 0 <= k < order.size:
    raise ValueError(f"k must be in [0, N={order.size}) (at least one row must stay), got k={k}")
  return order[: order.size - k]


def drop_highest_fraction(scores: Sequence[float] | np.ndarray, fraction: float) -> np.ndarray:
  """Positions of every score but the highest `fraction` (round-half-up(fraction N) rows, `fraction_to_k`)."""
  order = sort_order(scores)
  return drop_highest_k(scores, min(fraction_to_k(order.size, fraction), order.size - 1))


def window_bounds(n: int, q: float, window: int) -> tuple[int, int]:
  """[start, stop) of the `window`-sample window centred at round(q (n-1)) in sorted order, clipped."""
  if isinstance(q, bool) or not isinstance(q, (int, float, np.floating)) or not 0.0 <= float(q) <= 1.0:
    raise ValueError(f"quantile q must be in [0, 1], got {q!r}")
  if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
    raise ValueError(f"window must be a positive integer, got {window!r}")
  if window > n:
    raise ValueError(f"window={window} is larger than the number of scores N={n}")
  centre = int(math.floor(float(q) * (n - 1) + 0.5))
  start = min(max(centre - window // 2, 0), n - window)
  return start, start + window


def quantile_window(scores: Sequence[float] | np.ndarray, q: float, window: int = 512) -> np.ndarray:
  """Positions of the `window` samples around quantile `q` of the ascending-sorted scores."""
  order = sort_order(scores)
  start, stop = window_bounds(order.size, q, window)
  return order[start:stop]


def audit_scores(
    along_N: Sequence[float] | np.ndarray,
    own_N: Sequence[float] | np.ndarray | None = None,
    others_N: Sequence[float] | np.ndarray | None = None,
) -> dict[str, np.ndarray]:
  """The audit's risk scores per pair from its predicted changes of ln pi(y+) (nats; higher = predicted to fall
  more): 'audit_fall' = -(change at theta0 + D), and with the decomposition 'audit_own_fall' = -(own term),
  'audit_others_fall' = -(the other pairs' term)."""
  out = {"audit_fall": -_as_scores(along_N)}
  if own_N is not None and others_N is not None:
    out["audit_own_fall"] = -_as_scores(own_N)
    out["audit_others_fall"] = -_as_scores(others_N)
  return out


def select(
    scores: Sequence[float] | np.ndarray,
    mode: str,
    *,
    k: int | None = None,
    fraction: float | None = None,
    q: float | None = None,
    window: int = 512,
) -> np.ndarray:
  """Dispatch on `mode` in MODES; 'none' keeps every row in dataset order."""
  if mode == "none":
    return np.arange(_as_scores(scores).size, dtype=np.int64)
  if mode == "lowest_k":
    if k is None:
      raise ValueError("filter mode 'lowest_k' needs filter.k")
    return lowest_k(scores, k)
  if mode == "lowest_fraction":
    if fraction is None:
      raise ValueError("filter mode 'lowest_fraction' needs filter.fraction")
    return lowest_fraction(scores, fraction)
  if mode in ("drop_highest_k", "drop_highest_fraction"):
    if mode == "drop_highest_k":
      if k is None:
        raise ValueError("filter mode 'drop_highest_k' needs filter.k")
      return drop_highest_k(scores, k)
    if fraction is None:
      raise ValueError("filter mode 'drop_highest_fraction' needs filter.fraction")
    return drop_highest_fraction(scores, fraction)
  if mode == "quantile_window":
    if q is None:
      raise ValueError("filter mode 'quantile_window' needs filter.q")
    return quantile_window(scores, q, window)
  raise ValueError(f"unknown filter mode {mode!r}; expected one of {MODES}")
