"""The displacement plot of a training run, drawn from its metrics.jsonl (what TensorBoard would show, without it).

`plot_displacement(rows, path)`: three panels over the monitor's evaluations: the mean change of ln pi(y+) and
ln pi(y-) against the reference (likelihood displacement: the y+ line below 0), the share of pairs whose y+ fell
(Definition 1) and the loss (each step's training loss and the monitor's). Training writes it to
output_dir/displacement.png at every evaluation and at the end.
"""

from __future__ import annotations

from typing import Any, Sequence

from displacement_jax import plots

PLOT_FILE = "displacement.png"


def plot_displacement(rows: Sequence[dict[str, Any]], path: str) -> None:
  """Write the displacement plot of metrics rows `rows` to `path` (PNG, written to a temp file then renamed)."""
  plt = plots.pyplot()
  evals = [r for r in rows if "monitor/preferred_logprob_change" in r]
  steps = [r["step"] for r in evals]
  fig, (a, b, c) = plt.subplots(1, 3, figsize=(13, 3.6))
  a.plot(steps, [r["monitor/preferred_logprob_change"] for r in evals], "o-", label="ln pi(y+) change")
  a.plot(steps, [r["monitor/dispreferred_logprob_change"] for r in evals], "s-", label="ln pi(y-) change")
  a.axhline(0.0, color="gray", linewidth=0.8)
  a.set(xlabel="step", ylabel="nats vs reference", title="mean log-prob change")
  a.legend()
  b.plot(steps, [r["monitor/share_preferred_fell"] for r in evals], "o-", color="tab:red")
  b.set(xlabel="step", ylabel="share", ylim=(-0.02, 1.02), title="share of pairs whose y+ fell")
  train = [r for r in rows if "loss" in r and r.get("step", 0) > 0]
  c.plot([r["step"] for r in train], [r["loss"] for r in train], ".-", label="train loss (batch)")
  c.plot(steps, [r["monitor/loss"] for r in evals], "o-", label="monitor loss")
  c.set(xlabel="step", title="loss")
  c.legend()
  fig.tight_layout()
  plots.save(fig, path, dpi=90)
