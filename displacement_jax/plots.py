"""Figures: matplotlib on the Agg backend, imported only when a figure is drawn, and saved atomically.

plt = plots.pyplot()
fig, ax = plt.subplots()
...
plots.save(fig, path)        # PNG written to a temp file and renamed (rundir.atomic); the figure is closed
"""

from __future__ import annotations

from typing import Any

from displacement_jax import rundir


def pyplot() -> Any:
  """matplotlib.pyplot on the Agg backend (an optional heavy import, made when a figure is drawn)."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  return plt


def save(fig: Any, path: str, dpi: int = 110) -> str:
  """`fig` as a PNG at `path`, atomically; the figure is closed. Returns path."""
  with rundir.atomic(path) as tmp:
    fig.savefig(tmp, dpi=dpi, format="png")
  pyplot().close(fig)
  return path
