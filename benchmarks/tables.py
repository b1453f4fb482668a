"""How a benchmark reports: its markdown table printed, and appended to a file (BENCHMARKS.md) when asked."""

from __future__ import annotations


def emit(lines: list[str], append: str = "") -> str:
  """Join `lines` into a table, print it and, with `append`, add it after a blank line to that file."""
  table = "\n".join(lines)
  print(table)
  if append:
    with open(append, "a") as f:
      f.write("\n" + table)
  return table
