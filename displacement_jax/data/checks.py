"""Suspicious preference data: rows that load and train without complaint but deserve a warning.

- chosen == rejected: the pair's DPO gradient is zero, and RMSprop's normalisation can still turn the noise of
  such a step into a real update;
- exact duplicate rows (same prompt, chosen and rejected): counted twice by every mean;
- repeated `index` values: scores.jsonl and the filtered indices can no longer name a row (training refuses
  them, as the reference log-probs are keyed by index).

`check_examples` finds them (rows are the 0-based rows of the source, as in DataError); `DataChecks.warnings`
gives the lines that train and score print, `record()` what goes into metrics.jsonl / summary.json.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

from displacement_jax.errors import DataError

MAX_LISTED = 20  # row numbers listed in a warning / record (the counts are always complete)


@dataclasses.dataclass
class DataChecks:
  """Rows of the suspicious kinds of the module docstring."""

  identical: list[int] = dataclasses.field(default_factory=list)  # rows with chosen == rejected
  duplicates: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (row, the earlier row it repeats)
  repeated_indices: dict[int, list[int]] = dataclasses.field(default_factory=dict)  # index -> its rows (>= 2)

  def record(self) -> dict[str, Any]:
    """Counts and (the first MAX_LISTED) row numbers, for metrics.jsonl (`data/...`) and summary.json."""
    return {
        "identical_pairs": len(self.identical),
        "identical_pair_rows": self.identical[:MAX_LISTED],
        "duplicate_rows": len(self.duplicates),
        "duplicate_row_pairs": [list(d) for d in self.duplicates[:MAX_LISTED]],
        "repeated_indices": len(self.repeated_indices),
        "repeated_index_rows": {str(i): rows for i, rows in list(self.repeated_indices.items())[:MAX_LISTED]},
    }

  def warnings(self, source: str) -> list[str]:
    """One 'WARNING data ...' line per kind found."""
    out = []
    if self.identical:
      out.append(
          f"WARNING data {source}: {len(self.identical)} row(s) with chosen == rejected (zero preference gradient; "
          f"an adaptive optimizer may still step on them): rows {_listed(self.identical)}"
      )
    if self.duplicates:
      pairs = [f"{row} (= row {first})" for row, first in self.duplicates]
      out.append(f"WARNING data {source}: {len(self.duplicates)} exact duplicate row(s): rows {_listed(pairs)}")
    if self.repeated_indices:
      out.append(
          f"WARNING data {source}: {len(self.repeated_indices)} index value(s) used by several rows: "
          + _listed([f"index {i} at rows {', '.join(map(str, rows))}" for i, rows in self.repeated_indices.items()])
      )
    return out

  def raise_on_repeated_indices(self, source: str) -> None:
    """DataError naming the rows of the first repeated index (training needs unique indices)."""
    if self.repeated_indices:
      index, rows = next(iter(self.repeated_indices.items()))
      others = f" ({len(self.repeated_indices)} index values repeat)" if len(self.repeated_indices) > 1 else ""
      raise DataError(
          source, rows[1], "index", f"index {index} is also the index of row {rows[0]}{others}; indices must be unique"
      )


def _listed(items: Sequence[Any]) -> str:
  shown = ", ".join(str(x) for x in items[:MAX_LISTED])
  return shown + (f", ... ({len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else "")


def check_examples(examples: Sequence[Any]) -> DataChecks:
  """The suspicious rows of `examples` (PreferenceExamples; `row` or else the position names a row)."""
  checks = DataChecks()
  first_of: dict[str, int] = {}
  rows_of_index: dict[int, list[int]] = {}
  for pos, ex in enumerate(examples):
    row = ex.row if getattr(ex, "row", None) is not None else pos
    if ex.chosen == ex.rejected:
      checks.identical.append(row)
    key = json.dumps([ex.prompt, ex.chosen, ex.rejected], sort_keys=True)
    if key in first_of:
      checks.duplicates.append((row, first_of[key]))
    else:
      first_of[key] = row
    rows_of_index.setdefault(int(ex.index), []).append(row)
  checks.repeated_indices = {i: rows for i, rows in rows_of_index.items() if len(rows) > 1}
  return checks
