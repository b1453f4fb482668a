"""Errors that name what was wrong and where: file, row and field for data; argument, shape, dtype for arrays."""

from __future__ import annotations

from typing import Any

import numpy as np


class DataError(ValueError):
  """A bad input row: names the file (or dataset id), the 0-based row (and, for a jsonl file, its line) and the
  field."""

  def __init__(self, file: str, row: int | None, field: str | None, message: str):
    self.file, self.row, self.field, self.message = file, row, field, message
    where = [f"file {file!r}"]
    if row is not None:  # a jsonl row is its 0-based line index: name the 1-based line an editor shows too
      where.append(f"row {row} (0-based; line {row + 1})" if str(file).endswith(".jsonl") else f"row {row} (0-based)")
    if field is not None:
      where.append(f"field {field!r}")
    super().__init__(f"{', '.join(where)}: {message}")


class UsageError(Exception):
  """The run cannot start as asked (output_dir locked or holding another run, no usable checkpoint, a refused
  --resume): the CLIs print its one-line message and exit with status 2."""


def shape_of(x: Any) -> tuple[int, ...]:
  """The shape of an array-like, or () for scalars."""
  return tuple(getattr(x, "shape", ()))


def check_rank(name: str, x: Any, rank: int) -> None:
  """Raise ValueError unless `x` has exactly `rank` dimensions."""
  if len(shape_of(x)) != rank:
    raise ValueError(f"{name} must have rank {rank}, got shape {shape_of(x)}")


def check_same_shape(**arrays: Any) -> None:
  """Raise ValueError unless every keyword array has the same shape."""
  shapes = {k: shape_of(v) for k, v in arrays.items()}
  if len(set(shapes.values())) > 1:
    listed = ", ".join(f"{k}={s}" for k, s in shapes.items())
    raise ValueError(f"shape mismatch: {listed}")


def check_floating(name: str, x: Any) -> None:
  """Raise ValueError unless `x` has a floating dtype."""
  dtype = getattr(x, "dtype", None)
  if dtype is None or not np.issubdtype(np.dtype(dtype), np.floating):
    # jax bfloat16 is not a numpy floating subtype; accept it by name.
    if str(dtype) not in ("bfloat16", "float16", "float32", "float64"):
      raise ValueError(f"{name} must be a floating array, got dtype {dtype}")


def check_integer(name: str, x: Any) -> None:
  """Raise ValueError unless `x` has an integer dtype."""
  dtype = getattr(x, "dtype", None)
  if dtype is None or not np.issubdtype(np.dtype(dtype), np.integer):
    raise ValueError(f"{name} must be an integer array, got dtype {dtype}")


def describe(x: Any) -> str:
  """'shape (2, 3) dtype float32' for an array-like (used in error messages)."""
  return f"shape {shape_of(x)} dtype {getattr(x, 'dtype', type(x).__name__)}"


def check_mask(name: str, x: Any) -> None:
  """Raise ValueError unless `x` is a boolean or integer (0/1) mask array."""
  dtype = getattr(x, "dtype", None)
  ok = dtype is not None and (np.dtype(dtype) == np.bool_ or np.issubdtype(np.dtype(dtype), np.integer))
  if not ok:
    raise ValueError(f"{name} must be a bool or integer mask, got {describe(x)}")


def check_array(
    name: str, x: Any, *, rank: int | None = None, kind: str | None = None, shape: tuple[int | None, ...] | None = None
) -> None:
  """Static (trace-time) check of one array argument; the message names it with its shape and dtype.

  kind: None | 'floating' | 'integer' | 'mask'. shape: expected shape, None entries match anything.
  """
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise ValueError(f"{name} must be an array, got {type(x).__name__}")
  if rank is not None and len(x.shape) != rank:
    raise ValueError(f"{name} must have rank {rank}, got {describe(x)}")
  if shape is not None and (
      len(shape) != len(x.shape) or any(s is not None and s != t for s, t in zip(shape, x.shape))
  ):
    want = tuple("?" if s is None else s for s in shape)
    raise ValueError(f"{name} must have shape {want}, got {describe(x)}")
  try:
    if kind == "floating":
      check_floating(name, x)
    elif kind == "integer":
      check_integer(name, x)
    elif kind == "mask":
      check_mask(name, x)
  except ValueError as e:
    raise ValueError(f"{e} ({describe(x)})") from None


class Interrupted(Exception):
  """A run stopped by SIGTERM or SIGINT (a scheduler's preemption, Ctrl-C): the CLIs print its one-line message
  and exit with 128 + the signal number (143 for SIGTERM, 130 for SIGINT)."""

  def __init__(self, signum: int, message: str):
    self.signum, self.status = int(signum), 128 + int(signum)
    super().__init__(message)
