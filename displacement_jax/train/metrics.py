"""Metrics sinks: one JSON object per line in output_dir/metrics.jsonl, TensorBoard events, tqdm helpers.

Only process 0 writes. Values are converted to plain Python floats/ints/lists; non-finite floats are
written as the strings "nan" / "inf" / "-inf" so every line stays valid JSON.

Both files are written and flushed in the caller's thread, row by row (train.tb_events): a failed write (a full
disk) raises at once, naming the file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from typing import Any, Callable, Iterable, Mapping

import jax
import numpy as np
from tqdm.auto import tqdm

from displacement_jax import rundir
from displacement_jax.train import tb_events

TENSORBOARD_DIR = "tensorboard"  # TensorBoard events, under output_dir

METRICS_FILE = "metrics.jsonl"


def to_python(value: Any) -> Any:
  """A JSON-serialisable copy of a scalar/array/list/dict metric value."""
  if isinstance(value, Mapping):
    return {str(k): to_python(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_python(v) for v in value]
  if isinstance(value, (str, bool)) or value is None:
    return value
  arr = np.asarray(value)
  if arr.ndim > 0:
    return [to_python(v) for v in arr.tolist()]
  item = arr.item()
  if isinstance(item, float) and not math.isfinite(item):
    return str(item)
  return item


def read_metrics(path: str) -> list[dict[str, Any]]:
  """All rows of a metrics.jsonl file (or of output_dir/metrics.jsonl when given a directory); a line that does
  not parse raises rundir.CorruptFileError naming the file and the line."""
  if os.path.isdir(path):
    path = os.path.join(path, METRICS_FILE)
  return rundir.read_jsonl(path)


class MetricsWriter:
  """Append step metrics to metrics.jsonl and TensorBoard (scalars only) under `output_dir`."""

  def __init__(
      self,
      output_dir: str,
      *,
      tensorboard: bool = True,
      enabled: bool = True,
      truncate_after_step: int | None = None,
      log: Callable[[str], None] = print,
  ):
    """`truncate_after_step`: on resume, drop rows with step > this (they are recomputed) and lines cut short by
    a kill (said in one line naming the file); the kept rows are rewritten atomically before anything is added."""
    self.output_dir = output_dir
    self.enabled = enabled
    self.path = os.path.join(output_dir, METRICS_FILE)
    self._tb = None
    self.tensorboard_dir = os.path.join(output_dir, TENSORBOARD_DIR)
    self._failed = False
    if not enabled:
      return
    os.makedirs(output_dir, exist_ok=True)
    if truncate_after_step is not None and os.path.exists(self.path):
      rows, bad = rundir.salvage_jsonl(self.path)
      if bad:
        log(f"{self.path}: dropped line(s) {', '.join(map(str, bad))}, cut short or not valid JSON")
      rundir.write_jsonl(
          self.path, [r for r in rows if isinstance(r, dict) and r.get("step", 0) <= truncate_after_step]
      )
    elif truncate_after_step is None and os.path.exists(self.path):
      os.remove(self.path)
    self._file = open(self.path, "a")
    if tensorboard:
      try:
        self._tb = tb_events.ScalarEvents(self.tensorboard_dir)
      except OSError as e:
        raise OSError(e.errno, e.strerror, self.tensorboard_dir) from e

  def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Write one row {'step': step, **metrics}; return the JSON-ready row."""
    row = {"step": int(step), **{k: to_python(v) for k, v in metrics.items()}}
    if not self.enabled:
      return row
    try:
      self._file.write(json.dumps(row) + "\n")
      self._file.flush()
    except OSError as e:  # e.g. a full disk: name the file
      self._failed = True
      raise OSError(e.errno, e.strerror, self.path) from e
    if self._tb is not None:
      scalars = [
          (k, v) for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
      ]
      try:
        self._tb.write(int(step), scalars)
      except OSError as e:
        self._failed = True
        raise OSError(e.errno, e.strerror, self._tb.path) from e
    return row

  def close(self) -> None:
    if not self.enabled:
      return
    for sink, name in ((self._file, self.path), (self._tb, self._tb and self._tb.path)):
      try:
        if sink is not None:
          sink.close()  # every row is flushed already, unless a write failed
      except OSError as e:
        if not self._failed:  # else the rows' error, raised by `write`, is the one to report
          raise OSError(e.errno, e.strerror, name) from e

  def __enter__(self) -> "MetricsWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def progress_bar(total: int, initial: int = 0, *, enabled: bool = True, desc: str = "train"):
  """A tqdm bar over optimizer steps (disabled: a no-op object with the same methods)."""
  return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True)


def postfix(metrics: Mapping[str, Any], keys: Iterable[str]) -> dict[str, str]:
  """Short string versions of selected metrics for a tqdm postfix."""
  out = {}
  for key in keys:
    if key in metrics:
      out[key.split("/")[-1]] = f"{float(metrics[key]):.4g}"
  return out


def log(msg: str) -> None:
  """Print a line on process 0 (above any tqdm bar) and log it."""
  logging.info(msg)
  if jax.process_index() == 0:
    tqdm.write(msg, file=sys.stdout)
