r"""The offline demo: likelihood displacement on a real model, predicted before training, then prevented.

    python -m displacement_jax.train --config=configs/demo.py          # SmolLM2-135M-Instruct (packaged)
    python -m displacement_jax.train --config=configs/demo.py:tiny     # a tiny random Llama, seconds

Short factual pairs the project writes (`experiments.edit_pairs`, kind `edit`): "What is the capital of C?",
y+ = "The capital of C is X." (what the model already answers), y- = the same sentence with another capital.

1. PREDICT, before any update: the displacement audit (`audit`, replay route) replays the configured DPO run's
   batches at the initial parameters through its optimizer and sums the updates into D; per pair it gives the
   first-order change <grad ln pi(y+), D> and the model's change at theta0 + D. CHES and LN-CHES (the paper's
   Definition 2-3 proxies) are computed on the same pairs.
2. SHOW: DPO (RMSprop, torch defaults, `demo.lr`, batch `batch_size`, `num_epochs`), the train step and batches
   of `train.loop.run` (`experiments.short_runs`). Per pair: the change of ln pi(y+), ln pi(y-) and the margin;
   where the mass went (per-token probabilities of y+ before and after for one pair, and the tokens that gained).
3. How each prediction ranked the measured changes (Spearman, sign agreement).
4. PREVENT: the same run with each of `demo.remedies` (an SFT term, DPOP): ln pi(y+) held or not.

Outputs in output_dir: summary.json (everything printed, as numbers, and the seconds of each phase), pairs.npz
(per-pair log-probs before, after each run, the audit's predictions, CHES, LN-CHES), displacement.png (measured
against predicted per pair; ln pi(y+) change per run), data/edit.jsonl (the pairs).
"""

from __future__ import annotations

import os
import time
from typing import Any

import ml_collections
import numpy as np

from displacement_jax import plots, rundir
from displacement_jax.experiments import edit_pairs, gainers, short_runs
from displacement_jax.experiments.results import sign_agreement, spearman

SUMMARY_FILE, PAIRS_FILE, PLOT_FILE = "summary.json", "pairs.npz", "displacement.png"


def _log(msg: str) -> None:
  print(msg, flush=True)


class Laps:
  """Seconds of each phase, logged as each ends."""

  def __init__(self):
    self.seconds: dict[str, float] = {}
    self._t = time.monotonic()

  def __call__(self, phase: str, key: str) -> None:
    now = time.monotonic()
    self.seconds[key], self._t = now - self._t, now
    _log(f"[demo] {phase}: {self.seconds[key]:.1f} s")


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The whole demo; returns the summary dict (also written to output_dir/summary.json)."""
  os.makedirs(config.output_dir, exist_ok=True)
  lap = Laps()
  session = short_runs.Session(config)
  rows = edit_pairs.rows("edit", seed=int(config.seed), limit=int(config.demo.num_pairs))
  dataset = session.dataset(rows, "edit")
  start = session.logps(session.params0, dataset)
  _log(
      f"[demo] {len(rows)} minimal-edit pairs, e.g. {rows[0]['prompt']!r}: y+ {rows[0]['chosen']!r}, "
      f"y- {rows[0]['rejected']!r}"
  )
  _log(
      f"[demo] at the start: mean ln pi(y+) {start[0].mean():.3f} (pi(y+) {np.exp(start[0]).mean():.3f}), "
      f"mean ln pi(y-) {start[1].mean():.3f}"
  )
  lap("load the model and the pairs", "load")

  dpo = short_runs.flatten(config.demo.dpo)
  prediction = predict(session, dataset, dpo, config, start)
  lap("PREDICT (audit replay, CHES)", "predict")

  measured = session.train(dataset, dpo, start=start, keep_params=True)
  lap(f"DPO ({describe(config, dpo)})", "dpo")
  ranks = rank_predictions(prediction, measured.chosen_change())
  show(measured, ranks)
  mass = where_mass_went(session, dataset, measured.params, int(config.demo.example_pair))
  measured.params = None
  lap("where the mass went", "mass")

  remedies = {}
  for name, overrides in config.demo.remedies.items():
    remedies[name] = session.train(dataset, {**dpo, **short_runs.flatten(overrides)}, start=start)
    report_run(name, remedies[name])
  lap(f"PREVENT ({', '.join(config.demo.remedies)})", "remedies")
  summary = write_outputs(config, rows, start, prediction, ranks, measured, remedies, mass, lap.seconds)
  verdict(summary)
  _log(f"[demo] outputs: {config.output_dir}/{{{SUMMARY_FILE},{PAIRS_FILE},{PLOT_FILE}}}")
  return summary


def describe(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> str:
  """'rmsprop lr 1e-06, beta 0.1, batch 8, 1 epoch(s)' of the session's config with `overrides`."""
  o = {"optim.name": config.optim.name, "optim.lr": config.optim.lr, "num_epochs": config.num_epochs, **overrides}
  return (
      f"{o['optim.name']} lr {float(o['optim.lr']):g}, beta {config.loss.beta:g}, batch {config.batch_size}, "
      f"{o['num_epochs']} epoch(s)"
  )


def predict(
    session: short_runs.Session,
    dataset: Any,
    dpo: dict[str, Any],
    config: ml_collections.ConfigDict,
    start: tuple[np.ndarray, np.ndarray],
) -> dict[str, Any]:
  """The audit's per-pair predictions for the DPO run and CHES / LN-CHES of every pair, all before training."""
  audit = session.audit(dataset, dpo, start=start)
  scores = session.measures(dataset)
  ches, ln_ches = scores["ches"], scores["ln_ches"]
  first, along = audit["first_order"][0], audit["along_direction"][0]
  _log(f"[demo] PREDICTION for DPO ({describe(config, dpo)}), per pair, before any update:")
  _log(
      f"[demo]   audit, first order <grad ln pi(y+), D>: mean {first.mean():+.3f}, "
      f"ln pi(y+) falls for {np.sum(first < 0)}/{len(first)} pairs"
  )
  _log(
      f"[demo]   audit, model at theta0 + D (all orders along the run's summed update D): mean {along.mean():+.3f}, "
      f"ln pi(y+) falls for {np.sum(along < 0)}/{len(along)} pairs"
  )
  _log(f"[demo]   CHES mean {ches.mean():.1f}, LN-CHES mean {ln_ches.mean():.2f} (higher = more displacement)")
  return {"first_order": first, "along_direction": along, "ches": ches, "ln_ches": ln_ches, "audit": audit}


def report_run(name: str, m: short_runs.Measured) -> dict[str, float]:
  """One line per run: ln pi(y+), ln pi(y-) and the margin, mean change, and the share of pairs whose y+ fell."""
  s = short_runs.summary(m.chosen_change(), m.rejected_change())
  _log(
      f"[demo] {name}: d ln pi(y+) mean {s['chosen_change_mean']:+.3f}, fell for "
      f"{int(round(s['share_chosen_fell'] * len(m.chosen_N)))}/{len(m.chosen_N)} pairs (lowest "
      f"{s['chosen_change_min']:+.3f}); d ln pi(y-) mean {s['rejected_change_mean']:+.3f}; margin ln pi(y+) - ln pi(y-) "
      f"{s['margin_change_mean']:+.3f}"
  )
  return s


PREDICTORS = (  # (summary key, printed name, values' key in the prediction, sign, has a sign to compare)
    ("along_direction", "audit, model at theta0 + D", "along_direction", 1.0, True),
    ("first_order", "audit, first order", "first_order", 1.0, True),
    ("minus_ches", "minus CHES", "ches", -1.0, False),
    ("minus_ln_ches", "minus LN-CHES", "ln_ches", -1.0, False),
)


def rank_predictions(prediction: dict[str, Any], measured_N: np.ndarray) -> dict[str, dict[str, float]]:
  """{'spearman': {predictor: rho}, 'sign_agreement': {audit order: share}} against the measured d ln pi(y+)."""
  out: dict[str, dict[str, float]] = {"spearman": {}, "sign_agreement": {}}
  for key, _, source, sign, signed in PREDICTORS:
    out["spearman"][key] = spearman(sign * prediction[source], measured_N)
    if signed:
      out["sign_agreement"][key] = sign_agreement(prediction[source], measured_N)
  return out


def show(measured: short_runs.Measured, ranks: dict[str, dict[str, float]]) -> None:
  """What DPO did, and how each prediction ranked it."""
  report_run("DPO", measured)
  _log("[demo] how each prediction ranks the measured change of ln pi(y+) (Spearman; sign agreement):")
  for key, name, _, _, signed in PREDICTORS:
    agree = f"; sign {ranks['sign_agreement'][key]:.2f}" if signed else ""
    _log(f"[demo]   {name:28s} Spearman {ranks['spearman'][key]:+.2f}{agree}")


def where_mass_went(session: short_runs.Session, dataset: Any, params: Any, index: int) -> dict[str, Any]:
  """Per-token probabilities of one pair's y+ before and after DPO, and the tokens that gained the most at the
  position where y+ lost the most (`gainers.token_shift`)."""
  pair = dataset.pairs[index]
  tok = session.loaded.tokenizer
  probs_fn = gainers.make_probs_fn(session.loaded.model)
  shift = gainers.token_shift(probs_fn, session.params0, params, pair.prompt_ids, pair.chosen_ids, dataset.pad_id)
  p_before, p_after, worst = shift.p_before_K, shift.p_after_K, shift.worst_position()
  top = shift.top_gainers(3)
  names = [tok.decode([int(t)]) for t in shift.tokens_K]
  _log(f"[demo] where the mass went, pair {index}: p(each token of y+) before -> after DPO")
  _log("[demo]   " + " ".join(f"{n!r}:{a:.2f}->{b:.2f}" for n, a, b in zip(names, p_before, p_after)))
  top_names = [tok.decode([t]) for t, _ in top]
  _log(
      f"[demo]   largest fall at {names[worst]!r} ({p_before[worst]:.3f} -> {p_after[worst]:.3f}); gained there: "
      + ", ".join(f"{n!r} +{g:.3f}" for n, (_, g) in zip(top_names, top))
  )
  return {
      "pair": index,
      "tokens": names,
      "p_before": p_before.tolist(),
      "p_after": p_after.tolist(),
      "worst_position": worst,
      "gainers": top_names,
      "gains": [g for _, g in top],
  }


def write_outputs(config, rows, start, prediction, ranks, measured, remedies, mass, seconds) -> dict[str, Any]:
  """summary.json, pairs.npz and the plot."""
  runs = {"DPO": measured, **remedies}
  summary = {
      "model": str(config.model.get("path") or config.model.get("tiny")),
      "num_pairs": len(rows),
      "start_chosen_mean": float(start[0].mean()),
      "start_rejected_mean": float(start[1].mean()),
      "runs": {name: short_runs.summary(m.chosen_change(), m.rejected_change()) for name, m in runs.items()},
      "prediction": {
          "first_order_mean": float(prediction["first_order"].mean()),
          "along_direction_mean": float(prediction["along_direction"].mean()),
          "first_order_share_fell": float(np.mean(prediction["first_order"] < 0)),
          "along_direction_share_fell": float(np.mean(prediction["along_direction"] < 0)),
      },
      **ranks,
      "mass": mass,
      "dpo": short_runs.flatten(config.demo.dpo),
      "remedies": {k: short_runs.flatten(v) for k, v in config.demo.remedies.items()},
      "seconds": seconds,
  }
  rundir.write_npz(
      os.path.join(config.output_dir, PAIRS_FILE),
      {
          "chosen_start_N": start[0],
          "rejected_start_N": start[1],
          "ches_N": prediction["ches"],
          "ln_ches_N": prediction["ln_ches"],
          "first_order_2N": prediction["audit"]["first_order"],
          "along_direction_2N": prediction["audit"]["along_direction"],
          **{f"chosen_after_{name}_N": m.chosen_EN[-1] for name, m in runs.items()},
          **{f"rejected_after_{name}_N": m.rejected_EN[-1] for name, m in runs.items()},
      },
  )
  plot(os.path.join(config.output_dir, PLOT_FILE), prediction, runs)
  rundir.write_json(os.path.join(config.output_dir, SUMMARY_FILE), summary)  # last: the run is complete
  return summary


def plot(path: str, prediction: dict[str, Any], runs: dict[str, short_runs.Measured]) -> None:
  """Left: predicted (audit) against measured change of ln pi(y+) per pair; right: each run's change per pair."""
  plt = plots.pyplot()
  measured = runs["DPO"].chosen_change()
  fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4.2))
  for key, label, marker in (("along_direction", "model at theta0 + D", "o"), ("first_order", "first order", "x")):
    ax0.scatter(prediction[key], measured, s=14, marker=marker, label=f"audit: {label}")
  lo = min(measured.min(), prediction["along_direction"].min(), prediction["first_order"].min())
  hi = max(measured.max(), prediction["along_direction"].max(), prediction["first_order"].max())
  ax0.plot([lo, hi], [lo, hi], color="gray", lw=0.8)
  ax0.axhline(0, color="k", lw=0.6)
  ax0.axvline(0, color="k", lw=0.6)
  ax0.set(xlabel="predicted d ln pi(y+) (before training)", ylabel="measured d ln pi(y+) after DPO")
  ax0.legend(fontsize=8)
  order = np.argsort(measured)
  for name, m in runs.items():
    ax1.plot(m.chosen_change()[order], marker=".", lw=0.8, label=name)
  ax1.axhline(0, color="k", lw=0.6)
  ax1.set(xlabel="pair (sorted by the DPO run's change)", ylabel="d ln pi(y+)", title="DPO and its remedies")
  ax1.legend(fontsize=8)
  fig.suptitle("Likelihood displacement on minimal-edit pairs: predicted, measured, prevented")
  fig.tight_layout()
  plots.save(fig, path)


def verdict(summary: dict[str, Any]) -> None:
  """The closing lines: was pi(y+) displaced, and did each remedy hold it."""
  dpo = summary["runs"]["DPO"]
  n = summary["num_pairs"]
  if dpo["chosen_change_mean"] < 0 and dpo["margin_change_mean"] > 0:
    _log(
        f"[demo] RESULT: LIKELIHOOD DISPLACEMENT: DPO widened the margin by {dpo['margin_change_mean']:+.2f} nats while "
        f"ln pi(y+) fell by {-dpo['chosen_change_mean']:.2f} nats on average (for "
        f"{int(round(dpo['share_chosen_fell'] * n))}/{n} pairs)."
    )
  else:
    _log(f"[demo] RESULT: no displacement on average in this run (mean d ln pi(y+) {dpo['chosen_change_mean']:+.3f}).")
  for name, s in summary["runs"].items():
    if name != "DPO":
      held = s["chosen_change_mean"] >= 0
      _log(
          f"[demo] remedy {name}: ln pi(y+) {'held' if held else 'NOT held'} (mean {s['chosen_change_mean']:+.3f}, "
          f"fell for {int(round(s['share_chosen_fell'] * n))}/{n}), margin {s['margin_change_mean']:+.2f}"
      )
