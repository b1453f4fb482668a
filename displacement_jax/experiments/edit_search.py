"""Where does DPO displace a real model? A grid over pair kinds, optimizers, learning rates, epochs and objectives.

    python -m displacement_jax.train --config=configs/edit_search.py            # SmolLM2-135M-Instruct, ~40 min
    python -m displacement_jax.train --config=configs/edit_search.py:tiny       # the tiny random Llama (tests)

For every (kind, optimizer, lr, variant) of `config.search` one short run (`short_runs.Session.train`, the
batches and train step of `train.loop.run`) trains the kind's pairs (`edit_pairs.rows`) from the initial model and
measures ln pi(y+) and ln pi(y-) of every pair after each epoch. One model load serves the whole grid. With
`search.audit`, the displacement audit (`Session.audit`) predicts each run before it trains, and the last epoch's
row says how each prediction (first order, the model at theta0 + D, minus CHES, minus LN-CHES) ranks the
measured change of ln pi(y+) (Spearman) and how often the audit's sign is right. A run whose per-pair file an
earlier call of the same grid wrote (same output_dir) is read back instead of trained again: an interrupted search
resumes.

Outputs in output_dir: results.jsonl (one row per run and epoch: the setting and `short_runs.summary`'s
columns), results.md (the same as a table), pairs/<run>.npz (per-pair log-probs at the start and per epoch, and
the audit's predictions), audit_vs_lr.png (with `search.audit`: each predictor's Spearman and sign agreement
against the learning rate, per optimizer and kind).
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Any

import ml_collections
import numpy as np

from displacement_jax import plots, rundir
from displacement_jax.experiments import edit_pairs, short_runs
from displacement_jax.experiments.results import sign_agreement, spearman

RESULTS_JSONL, RESULTS_MD, AUDIT_PLOT = "results.jsonl", "results.md", "audit_vs_lr.png"
COLUMNS = ("kind", "optimizer", "lr", "variant", "epoch", "chosen_change_mean", "share_chosen_fell")


def _log(msg: str) -> None:
  print(msg, flush=True)


def grid(config: ml_collections.ConfigDict) -> list[tuple[str, str, float, str]]:
  """(kind, optimizer, lr, variant name) of every run, in the order they run."""
  s = config.search
  return list(itertools.product(s.kinds, s.optimizers, [float(x) for x in s.lrs], list(s.variants)))


def run_name(kind: str, optimizer: str, lr: float, variant: str) -> str:
  return f"{kind}_{optimizer}_lr{lr:g}_{variant}".replace("+", "_")


PREDICTORS = ("first_order", "along_direction", "minus_ches", "minus_ln_ches")


def markdown(rows: list[dict[str, Any]]) -> str:
  """results.md: one line per run and epoch (with the audit's columns when the rows have them)."""
  audited = any("spearman_along_direction" in r for r in rows)
  extra = (
      " Spearman: first order | at theta0 + D | -CHES | -LN-CHES | sign right: first order | at theta0 + D |"
      if audited
      else ""
  )
  head = (
      "| kind | optimizer | lr | variant | epoch | mean d ln pi(y+) | share of pairs whose ln pi(y+) fell | "
      "largest fall of ln pi(y+) | mean d ln pi(y-) | mean d margin |"
      + extra
      + "\n|"
      + "---|" * (10 + 6 * audited)
      + "\n"
  )

  def line(r: dict[str, Any]) -> str:
    out = (
        f'| {r["kind"]} | {r["optimizer"]} | {r["lr"]:g} | {r["variant"]} | {r["epoch"]} | '
        f'{r["chosen_change_mean"]:+.3f} | {r["share_chosen_fell"]:.2f} | {r["chosen_change_min"]:+.3f} | '
        f'{r["rejected_change_mean"]:+.3f} | {r["margin_change_mean"]:+.3f} |'
    )
    if audited:
      cells = [r.get(f"spearman_{p}") for p in PREDICTORS] + [r.get(f"sign_{p}") for p in PREDICTORS[:2]]
      out += "".join(" - |" if c is None else f" {c:+.2f} |" for c in cells)
    return out

  return head + "\n".join(line(r) for r in rows) + "\n"


def finished(path: str, audit: bool, epochs: int) -> tuple[short_runs.Measured, dict[str, np.ndarray] | None] | None:
  """(measured, audit predictions) of a run an earlier call finished (its npz, written atomically, readable and with
  `epochs` epochs and, when `audit`, the predictions), else None: the search resumes where it stopped."""
  if not os.path.exists(path):
    return None
  try:
    f = rundir.read_npz(path)
  except rundir.CorruptFileError as e:  # unreadable: run it again
    _log(f"[search] {e}; running it again")
    return None
  predicted = {k[len("predicted_") : -len("_2N")]: v for k, v in f.items() if k.startswith("predicted_")}
  if f["chosen_EN"].shape[0] != epochs or (audit and not predicted):
    return None
  measured = short_runs.Measured(f["chosen_N"], f["rejected_N"], f["chosen_EN"], f["rejected_EN"])
  return measured, predicted or None


def prediction_columns(predicted: dict[str, np.ndarray], measured_N: np.ndarray) -> dict[str, float]:
  """Spearman of each predictor with the measured change of ln pi(y+), and the audit's sign agreement."""
  out = {f"spearman_{name}": spearman(values, measured_N) for name, values in predicted.items()}
  out.update({f"sign_{name}": sign_agreement(predicted[name], measured_N) for name in PREDICTORS[:2]})
  return out


def run(config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
  """The whole grid; returns the results rows (also written to output_dir)."""
  os.makedirs(os.path.join(config.output_dir, "pairs"), exist_ok=True)
  session = short_runs.Session(config)
  audit = bool(config.search.get("audit", False))
  datasets, starts, ches = {}, {}, {}
  for kind in config.search.kinds:
    datasets[kind] = session.dataset(
        edit_pairs.rows(kind, seed=int(config.seed), limit=int(config.search.num_pairs)), kind
    )
    starts[kind] = session.logps(session.params0, datasets[kind])
    if audit:
      ches[kind] = session.ches(datasets[kind])
    _log(
        f"[search] {kind}: {len(datasets[kind].pairs)} pairs, at the start mean ln pi(y+) "
        f"{starts[kind][0].mean():.3f}, ln pi(y-) {starts[kind][1].mean():.3f}"
    )
  settings, rows, t0 = grid(config), [], time.monotonic()
  for n, (kind, optimizer, lr, variant) in enumerate(settings, 1):
    overrides = {"optim.name": optimizer, "optim.lr": lr, **short_runs.flatten(config.search.variants[variant])}
    name = run_name(kind, optimizer, lr, variant)
    path = os.path.join(config.output_dir, "pairs", f"{name}.npz")
    done = finished(path, audit, int(config.num_epochs))
    if done is not None:  # an earlier call of the same grid finished this run: its verified per-pair file
      measured, predicted = done
      _log(f"[search] {name}: finished earlier, read from {path}")
    else:
      predicted = session.audit(datasets[kind], overrides, start=starts[kind]) if audit else None
      measured = session.train(datasets[kind], overrides, start=starts[kind])
      rundir.write_npz(
          path,
          {
              "chosen_N": measured.chosen_N,
              "rejected_N": measured.rejected_N,
              "chosen_EN": measured.chosen_EN,
              "rejected_EN": measured.rejected_EN,
              **({f"predicted_{k}_2N": v for k, v in predicted.items()} if audit else {}),
          },
      )
    for epoch in range(1, measured.chosen_EN.shape[0] + 1):
      row = {"kind": kind, "optimizer": optimizer, "lr": lr, "variant": variant, "epoch": epoch}
      row.update(short_runs.summary(measured.chosen_change(epoch), measured.rejected_change(epoch)))
      if audit and epoch == measured.chosen_EN.shape[0]:  # the audit predicts the whole run
        values = {
            "first_order": predicted["first_order"][0],
            "along_direction": predicted["along_direction"][0],
            "minus_ches": -ches[kind]["ches"],
            "minus_ln_ches": -ches[kind]["ln_ches"],
        }
        row.update(prediction_columns(values, measured.chosen_change(epoch)))
      rows.append(row)
    elapsed = time.monotonic() - t0
    last = rows[-1]
    _log(
        f"[search] {n}/{len(settings)} {name}: after {last['epoch']} epoch(s) d ln pi(y+) "
        f"{last['chosen_change_mean']:+.3f}, fell for {last['share_chosen_fell']:.0%} of pairs "
        f"({elapsed:.0f} s, ETA {elapsed / n * (len(settings) - n):.0f} s)"
    )
  rundir.write_jsonl(os.path.join(config.output_dir, RESULTS_JSONL), rows)
  rundir.write_bytes(os.path.join(config.output_dir, RESULTS_MD), markdown(rows).encode())
  if audit:
    plot_audit(os.path.join(config.output_dir, AUDIT_PLOT), rows)
  _log(f"[search] outputs: {config.output_dir}/{{{RESULTS_JSONL},{RESULTS_MD},pairs/}}")
  return rows


def plot_audit(path: str, rows: list[dict[str, Any]]) -> None:
  """Each predictor's Spearman (left) and the audit's sign agreement (right) against lr, per (kind, optimizer)."""
  plt = plots.pyplot()
  audited = [r for r in rows if "spearman_along_direction" in r]
  fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4.2))
  for kind, optimizer in sorted({(r["kind"], r["optimizer"]) for r in audited}):
    runs = sorted((r for r in audited if (r["kind"], r["optimizer"]) == (kind, optimizer)), key=lambda r: r["lr"])
    lrs = [r["lr"] for r in runs]
    for name, style in zip(PREDICTORS, ("x--", "o-", "s:", "^:")):
      ax0.plot(lrs, [r[f"spearman_{name}"] for r in runs], style, label=f"{kind} {optimizer}: {name}")
    for name, style in zip(PREDICTORS[:2], ("x--", "o-")):
      ax1.plot(lrs, [r[f"sign_{name}"] for r in runs], style, label=f"{kind} {optimizer}: {name}")
  for ax, label in ((ax0, "Spearman with the measured d ln pi(y+)"), (ax1, "share of pairs with the right sign")):
    ax.set(xscale="log", xlabel="learning rate", ylabel=label)
    ax.axhline(0, color="k", lw=0.6)
    ax.legend(fontsize=7)
  fig.suptitle("The displacement audit against the learning rate (one epoch of DPO)")
  fig.tight_layout()
  plots.save(fig, path)
