"""Figures: matplotlib on the Agg backend (selected when a figure is drawn), saved atomically.

plt = plots.pyplot()
fig, ax = plt.subplots()
...
plots.save(fig, path)        # PNG written to a temp file and renamed (rundir.atomic); the figure is closed
"""

from __future__ import annotations

from typing import Any

import matplotlib
import matplotlib.pyplot as plt

from displacement_jax import rundir


def pyplot() -> Any:
  """matplotlib.pyplot, switched to the Agg backend (no display needed) before a figure is drawn."""
  matplotlib.use("Agg")
  return plt


def save(fig: Any, path: str, dpi: int = 110) -> str:
  """`fig` as a PNG at `path`, atomically; the figure is closed. Returns path."""
  with rundir.atomic(path) as tmp:
    fig.savefig(tmp, dpi=dpi, format="png")
  pyplot().close(fig)
  return path
