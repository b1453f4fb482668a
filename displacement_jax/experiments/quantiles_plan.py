"""Section 5 plan: which rows are scored and which quantile window of each measure every run trains on.

Score N preference pairs under the initial model with each measure in `MEASURES`; for each quantile q in
`QUANTILES` the run trains on the `WINDOW`-sample window of the ascending-sorted scores centred at
round(q (N-1)) (`filtering.quantile_window`), for each seed in `SEEDS` (Figure 2). `experiments.quantiles`
runs the plan; `configs/ches_quantiles.py` sweeps it.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from displacement_jax.score import filtering

MEASURES = ("ches", "minus_normalized_edit_distance", "last_hidden_inner_product")
QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)
SEEDS = (0, 1, 2)
WINDOW = 512


def check_measure(measure: str) -> str:
  if measure not in MEASURES:
    raise ValueError(f'quantiles.measure must be one of {MEASURES} or "all", got {measure!r}')
  return measure


def sample_rows(num_total: int, num_rows: int, seed: int = 0) -> np.ndarray:
  """Sorted positions of `num_rows` rows drawn without replacement (all rows when num_rows <= 0 or >= N)."""
  if num_total < 1:
    raise ValueError(f"the dataset is empty (num_total={num_total})")
  if num_rows <= 0 or num_rows >= num_total:
    return np.arange(num_total, dtype=np.int64)
  return np.sort(np.random.default_rng(seed).choice(num_total, size=num_rows, replace=False)).astype(np.int64)


def plan(
    scores_by_measure: Mapping[str, Sequence[float] | np.ndarray],
    quantiles: Sequence[float] = QUANTILES,
    window: int = WINDOW,
) -> dict[tuple[str, float], np.ndarray]:
  """{(measure, q): positions of the training window} for every measure and quantile.

  Positions index the scored rows; the window is centred at round(q (N-1)) of the ascending sort.
  """
  out = {}
  for measure, scores in scores_by_measure.items():
    check_measure(measure)
    for q in quantiles:
      out[(measure, float(q))] = filtering.quantile_window(scores, float(q), window)
  return out
