"""Outputs of a scoring run: summary statistics, scores.jsonl, the LN-CHES histogram, and the filtered subset."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence

import ml_collections
import numpy as np

from displacement_jax import filtering
from displacement_jax.data import schema
from displacement_jax.scoring import MEASURES

SCORES_FILE, SUMMARY_FILE, HIST_FILE = "scores.jsonl", "summary.json", "ln_ches_hist.png"
FILTERED_FILE, FILTERED_INDICES_FILE = "filtered.jsonl", "filtered_indices.json"
QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


def summarize(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Count, mean, std, min/max and quantiles of each measure (non-finite values counted, not averaged)."""
  summary: dict[str, Any] = {
      "num_rows": len(results),
      "truncation": {
          "truncated_pairs": sum(bool(r.get("chosen_truncated") or r.get("rejected_truncated")) for r in results),
          "truncated_chosen": sum(bool(r.get("chosen_truncated")) for r in results),
          "truncated_rejected": sum(bool(r.get("rejected_truncated")) for r in results),
      },
  }
  for measure in MEASURES + ("chosen_len", "rejected_len"):
    vals = np.asarray([r[measure] for r in results], np.float64)
    finite = vals[np.isfinite(vals)]
    stats: dict[str, Any] = {"num_nonfinite": int(vals.size - finite.size)}
    if finite.size:
      stats.update(
          mean=float(finite.mean()),
          std=float(finite.std()),
          quantiles={str(q): float(np.quantile(finite, q)) for q in QUANTILES},
      )
    summary[measure] = stats
  return summary


def _json_float(x: float) -> Any:
  return x if math.isfinite(x) else ("nan" if math.isnan(x) else ("inf" if x > 0 else "-inf"))


def write_scores(results: Sequence[dict[str, Any]], path: str) -> None:
  """scores.jsonl: one JSON object per row (non-finite floats as "nan"/"inf" strings)."""
  with open(path, "w") as f:
    for r in results:
      f.write(json.dumps({k: _json_float(v) if isinstance(v, float) else v for k, v in r.items()}) + "\n")


def plot_histogram(values: np.ndarray, path: str, *, title: str = "LN-CHES") -> None:
  """Histogram PNG of one measure (matplotlib Agg)."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  values = np.asarray(values, np.float64)
  values = values[np.isfinite(values)]
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.hist(values, bins=min(50, max(5, values.size // 4)), color="tab:blue", alpha=0.8)
  ax.set_xlabel(title)
  ax.set_ylabel("pairs")
  ax.set_title(f"{title} over {values.size} pairs (higher = more displacement)")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def select_rows(results: Sequence[dict[str, Any]], filter_cfg: ml_collections.ConfigDict) -> np.ndarray:
  """Positions (into `results`) picked by filter.mode on filter.measure, ascending by score."""
  measure = filter_cfg.get("measure", "ln_ches")
  if measure not in MEASURES:
    raise ValueError(f"config.filter.measure must be one of {MEASURES}, got {measure!r}")
  scores = np.asarray([r[measure] for r in results], np.float64)
  k, fraction, q = filter_cfg.get("k"), filter_cfg.get("fraction"), filter_cfg.get("q")
  return filtering.select(
      scores,
      filter_cfg.get("mode", "none"),
      k=int(k) if k else None,
      fraction=float(fraction) if fraction else None,
      q=None if q is None else float(q),
      window=int(filter_cfg.get("window", 512)),
  )


def write_filtered(
    examples: Sequence[Any],
    results: Sequence[dict[str, Any]],
    selected: np.ndarray,
    filter_cfg: ml_collections.ConfigDict,
    output_dir: str,
) -> dict[str, Any]:
  """filtered.jsonl (selected rows, dataset order) + filtered_indices.json; returns the indices record."""
  keep = np.sort(np.asarray(selected, np.int64))
  with open(os.path.join(output_dir, FILTERED_FILE), "w") as f:
    for pos in keep:
      f.write(json.dumps(schema.example_to_json(examples[pos])) + "\n")
  measure = filter_cfg.get("measure", "ln_ches")
  record = {
      "mode": filter_cfg.mode,
      "measure": measure,
      "k": filter_cfg.get("k"),
      "fraction": filter_cfg.get("fraction"),
      "q": filter_cfg.get("q"),
      "window": filter_cfg.get("window"),
      "num_rows": len(results),
      "num_selected": int(keep.size),
      "indices": [int(results[p]["index"]) for p in keep],  # dataset indices, dataset order
      "indices_by_score": [int(results[p]["index"]) for p in selected],  # ascending by the measure
      "scores_by_score": [_json_float(float(results[p][measure])) for p in selected],
  }
  with open(os.path.join(output_dir, FILTERED_INDICES_FILE), "w") as f:
    json.dump(record, f, indent=1)
  return record
