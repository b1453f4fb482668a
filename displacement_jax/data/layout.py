"""Sizes and shapes of padded batches: round-up, length buckets, the batch plan, the pad id (imports nothing).

Every padded dimension in the project is computed here, so a batch built by training, scoring, the monitor or
an experiment has the same shape rules (and so reuses the same compiled executables).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def round_up(n: int, multiple: int) -> int:
  """The smallest multiple of `multiple` that is >= n."""
  return -(-int(n) // int(multiple)) * int(multiple)


def bucket_length(length: int, max_length: int, min_bucket: int = 16, step: int = 64) -> int:
  """Smallest bucket that holds `length`, capped at `max_length`.

  Buckets are min_bucket * 2^k up to 2 * step, then multiples of `step`: short rows get tight power-of-two
  buckets, long rows waste at most `step - 1` padding positions (at the price of a few more compilations).
  """
  if length < 1:
    raise ValueError(f"sequence length must be >= 1, got {length}")
  b = min_bucket
  while b < length and b < 2 * step:
    b *= 2
  if b < length:
    b = round_up(length, step)
  return int(min(b, max(max_length, length)))


def plan_batches(
    lengths: Sequence[int], batch_size: int, max_length: int, *, bucketed: bool = True
) -> list[tuple[np.ndarray, int]]:
  """[(row positions, padded length)] covering every row once.

  bucketed: rows sorted by length (stable) and cut into batches of `batch_size`, each padded to the bucket
  of its longest row. Not bucketed: dataset order, every batch padded to `max_length` (the reference path).
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  lengths = np.asarray(lengths, np.int64)
  order = np.argsort(lengths, kind="stable") if bucketed else np.arange(len(lengths))
  plan = []
  for start in range(0, len(order), batch_size):
    rows = order[start : start + batch_size]
    pad_to = bucket_length(int(lengths[rows].max()), max_length) if bucketed else int(max_length)
    plan.append((rows, pad_to))
  return plan


def fill_rows(rows: np.ndarray, size: int) -> np.ndarray:
  """`rows` padded to `size` entries by repeating its last entry (filler rows that callers drop)."""
  rows = np.asarray(rows)
  return np.concatenate([rows, np.full(size - len(rows), rows[-1], rows.dtype)])


def pad_id_of(tokenizer: Any, fallback: int | None = 0) -> int | None:
  """The tokenizer's pad token id, else `fallback` (0 by default; callers pass the EOS id or the config's)."""
  pad = getattr(tokenizer, "pad_token_id", None)
  return int(pad) if pad is not None else fallback
