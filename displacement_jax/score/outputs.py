"""Outputs of a scoring run: summary statistics, scores.jsonl, the LN-CHES histogram, the filtered subset, and
what makes them safe to trust: every file is written to a temp file and renamed into place (`rundir.atomic`), the
outputs of an earlier run are moved aside to previous/ when a run starts (`move_aside`), run.json says
"complete" only once everything is written (`rundir.write_run`), and scores.partial.jsonl (`Progress`) holds the
rows of every finished batch so that `--resume` continues an interrupted run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Any, Callable, Sequence

import ml_collections
import numpy as np

from displacement_jax import plots, rundir
from displacement_jax.score import filtering
from displacement_jax.data import schema
from displacement_jax.score.core import MEASURES

SCORES_FILE, SUMMARY_FILE, HIST_FILE, RISKY_FILE = "scores.jsonl", "summary.json", "ln_ches_hist.png", "risky.jsonl"
FILTERED_FILE, FILTERED_INDICES_FILE = "filtered.jsonl", "filtered_indices.json"
PROGRESS_FILE, PREVIOUS_DIR = "scores.partial.jsonl", "previous"
OUTPUT_FILES = (
    SCORES_FILE,
    SUMMARY_FILE,
    HIST_FILE,
    RISKY_FILE,
    FILTERED_FILE,
    FILTERED_INDICES_FILE,
    rundir.RUN_FILE,
    PROGRESS_FILE,
)
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


# ------------------------------------------------------------------------------------- safe files of a run


def move_aside(output_dir: str) -> list[str]:
  """Move the outputs of an earlier run (OUTPUT_FILES) into output_dir/previous/ (replacing what an even
  earlier run left there); returns the names moved."""
  found = [name for name in OUTPUT_FILES if os.path.exists(os.path.join(output_dir, name))]
  if found:
    previous = os.path.join(output_dir, PREVIOUS_DIR)
    shutil.rmtree(previous, ignore_errors=True)
    os.makedirs(previous)
    for name in found:
      os.replace(os.path.join(output_dir, name), os.path.join(previous, name))
  return found


class Progress:
  """scores.partial.jsonl: {"pos": position, **result} per scored row, sealed with its checksum (rundir.seal),
  appended and fsynced after every batch."""

  def __init__(self, output_dir: str):
    self.path = os.path.join(output_dir, PROGRESS_FILE)
    self._file = open(self.path, "a")  # pylint: disable=consider-using-with  (closed by close())

  def append(self, batch: Sequence[tuple[int, dict[str, Any]]]) -> None:
    try:
      self._file.write("".join(json.dumps(rundir.seal({"pos": int(p), **r})) + "\n" for p, r in batch))
      self._file.flush()
      os.fsync(self._file.fileno())
    except OSError as e:
      raise OSError(e.errno, e.strerror, self.path) from e

  def close(self) -> None:
    self._file.close()

  @staticmethod
  def read(output_dir: str, num_rows: int, *, log: Callable[[str], None] = print) -> dict[int, dict[str, Any]]:
    """{position: result} of the rows an interrupted run finished. A line cut by a kill, or a row that does not
    match its checksum (edited), is not trusted: said in one line naming the file, dropped from it (rewritten
    atomically) and scored again."""
    path, done = os.path.join(output_dir, PROGRESS_FILE), {}
    if not os.path.exists(path):
      return done
    rows, bad = rundir.salvage_jsonl(path)
    untrusted = len(bad)
    for row in rows:
      row = rundir.unseal(row)
      pos = row.pop("pos", None) if row is not None else None
      if isinstance(pos, int) and 0 <= pos < num_rows:
        done[pos] = row
      else:
        untrusted += 1
    if untrusted:
      log(f"{path}: {untrusted} row(s) cut short or not matching their checksum; they are scored again")
      rundir.write_jsonl(path, (rundir.seal({"pos": p, **r}) for p, r in sorted(done.items())))
    return done


# ---------------------------------------------------------------------------------------------- the outputs


def write_scores(results: Sequence[dict[str, Any]], path: str) -> None:
  """scores.jsonl: one JSON object per row (non-finite floats as "nan"/"inf" strings), atomically."""
  rundir.write_jsonl(path, ({k: _json_float(v) if isinstance(v, float) else v for k, v in r.items()} for r in results))


def plot_histogram(
    values: np.ndarray,
    path: str,
    *,
    title: str = "LN-CHES",
    cutoff: float | None = None,
    flagged: Sequence[float] = (),
) -> None:
  """Histogram PNG of one measure (matplotlib Agg); `cutoff`: the filter's boundary (a dashed line), `flagged`: the
  values of the riskiest rows (red ticks under the bars)."""
  plt = plots.pyplot()

  values = np.asarray(values, np.float64)
  values = values[np.isfinite(values)]
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.hist(values, bins=min(50, max(5, values.size // 4)), color="tab:blue", alpha=0.8)
  if cutoff is not None and math.isfinite(cutoff):
    ax.axvline(cutoff, color="black", linestyle="--", label=f"filter cutoff {cutoff:.4g}")
  flagged = [v for v in flagged if math.isfinite(v)]
  if flagged:
    ax.plot(flagged, [0] * len(flagged), "|", color="red", markersize=18, mew=2, label=f"{len(flagged)} riskiest")
  if cutoff is not None or flagged:
    ax.legend(loc="upper left")
  ax.set_xlabel(title)
  ax.set_ylabel("pairs")
  ax.set_title(f"{title} over {values.size} pairs (higher = more displacement)")
  fig.tight_layout()
  plots.save(fig, path, dpi=100)


def excerpt(value: Any, width: int = 48) -> str:
  """A one-line excerpt of a prompt/response (a message list: its last message's content)."""
  text = value if isinstance(value, str) else (value[-1].get("content", "") if value else "")
  text = " ".join(str(text).split())
  return text if len(text) <= width else text[: width - 3] + "..."


def riskiest(
    examples: Sequence[Any], results: Sequence[dict[str, Any]], k: int, measure: str = "ln_ches"
) -> list[dict[str, Any]]:
  """The `k` rows with the highest `measure` (most displacement expected), highest first: row index (0-based,
  the row's `index`), both scores with their rank (1 = riskiest) and short excerpts of prompt/chosen/rejected."""
  rank = {}
  for m in ("ches", "ln_ches"):
    scores = np.asarray([r[m] for r in results], np.float64)
    order = np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable")
    rank[m] = {int(p): i + 1 for i, p in enumerate(order)}
  scores = np.nan_to_num(np.asarray([r[measure] for r in results], np.float64), nan=-np.inf)
  top = np.argsort(-scores, kind="stable")[: max(int(k), 0)]
  rows = []
  for p in top:
    r, ex = results[p], examples[p]
    why = f"LN-CHES {r['ln_ches']:.4g} (rank {rank['ln_ches'][int(p)]}), CHES {r['ches']:.4g} (rank {rank['ches'][int(p)]})"
    rows.append(
        {
            "row": int(r["index"]),
            "measure": measure,
            "score": _json_float(float(r[measure])),
            "ches": _json_float(float(r["ches"])),
            "ln_ches": _json_float(float(r["ln_ches"])),
            "rank_ches": rank["ches"][int(p)],
            "rank_ln_ches": rank["ln_ches"][int(p)],
            "why": why,
            "prompt": excerpt(ex.prompt),
            "chosen": excerpt(ex.chosen),
            "rejected": excerpt(ex.rejected),
        }
    )
  return rows


def risky_lines(rows: Sequence[dict[str, Any]], num_rows: int, path: str) -> list[str]:
  """What score prints of `riskiest`: a header naming the file, then one line per row."""
  if not rows:
    return []
  out = [
      f"riskiest {len(rows)} of {num_rows} pairs by {rows[0]['measure']} (higher = more displacement expected; "
      f"row = 0-based index in the data) -> {path}"
  ]
  for r in rows:
    out.append(
        f"  row {r['row']:>4}: {r['why']} | prompt {r['prompt']!r} | chosen {r['chosen']!r} | "
        f"rejected {r['rejected']!r}"
    )
  return out


def write_risky(rows: Sequence[dict[str, Any]], path: str) -> None:
  """risky.jsonl: one `riskiest` row per line, riskiest first, atomically."""
  rundir.write_jsonl(path, rows)


def cutoff_of(results: Sequence[dict[str, Any]], selected: np.ndarray, measure: str) -> float | None:
  """The filter's boundary on `measure`: midway between the highest kept and the lowest dropped score above it
  (None when nothing above the kept rows is dropped, e.g. a quantile window or no filter)."""
  scores = np.asarray([r[measure] for r in results], np.float64)
  kept = np.zeros(scores.size, bool)
  kept[np.asarray(selected, np.int64)] = True
  top_kept = scores[kept].max() if kept.any() else -np.inf
  above = scores[~kept & (scores >= top_kept)]
  return float((top_kept + above.min()) / 2) if above.size and np.isfinite(top_kept) else None


def select_rows(
    results: Sequence[dict[str, Any]],
    filter_cfg: ml_collections.ConfigDict,
    measures: Sequence[str] = MEASURES,
    name: str = "config.filter",
) -> np.ndarray:
  """Positions (into `results`) picked by filter.mode on filter.measure (one of `measures`), ascending by score;
  `name` is the config block named in errors."""
  measure = filter_cfg.get("measure", "ln_ches")
  if measure not in measures:
    raise ValueError(f"{name}.measure must be one of {tuple(measures)}, got {measure!r}")
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
    cutoff: float | None = None,
) -> dict[str, Any]:
  """filtered.jsonl (selected rows, dataset order) + filtered_indices.json (kept and dropped row indices); returns
  the indices record."""
  keep = np.sort(np.asarray(selected, np.int64))
  kept = set(keep.tolist())
  rundir.write_jsonl(os.path.join(output_dir, FILTERED_FILE), (schema.example_to_json(examples[pos]) for pos in keep))
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
      "dropped": [int(r["index"]) for p, r in enumerate(results) if p not in kept],  # dataset order
      "indices_by_score": [int(results[p]["index"]) for p in selected],  # ascending by the measure
      "scores_by_score": [_json_float(float(results[p][measure])) for p in selected],
      "cutoff": cutoff,  # between the highest kept and the lowest dropped score above it (cutoff_of)
  }
  rundir.write_json(os.path.join(output_dir, FILTERED_INDICES_FILE), record)
  return record
