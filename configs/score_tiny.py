"""Score a tiny preference jsonl with a tiny random model (offline, seconds on CPU).

    python -m displacement_jax.score --config=configs/score_tiny.py
    python -m displacement_jax.score --config=configs/score_tiny.py \
        --config.filter.mode=quantile_window --config.filter.q=1.0 --config.filter.window=4

Real runs: set model.path (HF dir or hub id), data.path (e.g. HuggingFaceH4/ultrafeedback_binarized with
data.split='train_prefs', data.limit=5000, data.seed=...), data.format='prompter_assistant',
data.add_special_tokens=True, data.max_length=512 (the paper's Section 5 protocol).
"""

from __future__ import annotations

import os

import ml_collections

from configs import base

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "displacement_jax", "assets")


def get_filter_config() -> ml_collections.ConfigDict:
  """The `filter` block shared by score configs (displacement_jax.score.filtering)."""
  f = ml_collections.ConfigDict()
  f.mode = (
      "none"  # 'none' | 'lowest_k' | 'lowest_fraction' | 'drop_highest_k' | 'drop_highest_fraction' | 'quantile_window'
  )
  f.measure = "ln_ches"  # 'ches' | 'ln_ches' | 'minus_normalized_edit_distance' | 'last_hidden_inner_product'
  f.k = 0  # lowest_k: keep this many rows (lowest scores); drop_highest_k: drop this many (highest scores)
  f.fraction = 0.0  # lowest_fraction: keep round(fraction * N) rows (SORRY-Bench: 0.05); drop_highest_fraction: drop
  f.top_k = 10  # the riskiest rows by the measure: printed, written to risky.jsonl, marked in the histogram
  f.q = 0.5  # quantile_window: quantile in [0, 1] of the ascending-sorted scores
  f.window = 512  # quantile_window: window size centred at round(q (N-1)), clipped to [0, N)
  return f


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = base.get_base_config()
  config.output_dir = "runs/score_tiny"
  config.model.tiny = "llama"
  config.model.seed = 0
  config.data.path = os.path.join(ASSETS, "tiny_preferences.jsonl")
  config.data.format = "prompter_assistant"
  config.data.max_length = 64
  config.data.schema = "auto"  # 'auto' | 'generic' | 'ultrafeedback' | 'alpaca_farm' | 'persona'
  config.data.seed = 0  # data.limit > 0 keeps `limit` random rows drawn with this seed
  config.data.truncation = "truncate_response"  # or 'error': a pair longer than max_length is a DataError
  config.batch_size = 8  # rows per scoring batch (rounded up to a multiple of the device count)
  config.filter = get_filter_config()
  return config
