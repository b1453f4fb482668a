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
import re
import time
from typing import Any

import ml_collections
import numpy as np

from displacement_jax import plots, rundir
from displacement_jax.audit import replay
from displacement_jax.experiments import edit_pairs, gainers, short_runs
from displacement_jax.experiments.results import sign_agreement, spearman
from displacement_jax.experiments.sorry_bench import generation

RESULTS_JSONL, RESULTS_MD, AUDIT_PLOT = "results.jsonl", "results.md", "audit_vs_lr.png"
SCATTER_PLOT = "audit_scatter.png"
COLUMNS = ("kind", "optimizer", "lr", "variant", "epoch", "chosen_change_mean", "share_chosen_fell")
ONPOLICY = "onpolicy"  # the kind sampled from the model itself, beside edit_pairs.KINDS
GROUPS = ("right_over_wrong", "both_right", "both_wrong")  # the on-policy pairs by what their responses state


def _log(msg: str) -> None:
  print(msg, flush=True)


def grid(config: ml_collections.ConfigDict) -> list[tuple[str, str, float, str]]:
  """(kind, optimizer, lr, variant name) of every run, in the order they run."""
  s = config.search
  return list(itertools.product(s.kinds, s.optimizers, [float(x) for x in s.lrs], list(s.variants)))


def run_name(kind: str, optimizer: str, lr: float, variant: str) -> str:
  return f"{kind}_{optimizer}_lr{lr:g}_{variant}".replace("+", "_")


# Each predictor of the measured change of ln pi(y+) (higher = predicted to gain more): the audit's orders, then
# the measures at the initial model with the sign that makes them predict a gain (CHES and LN-CHES are higher
# for MORE displacement, edit distance enters negated already, the last-hidden inner product higher = more).
AUDIT_ORDERS = ("first_order", "second_order", "along_direction")
MEASURES = ("minus_ches", "minus_ln_ches", "minus_normalized_edit_distance", "minus_last_hidden_inner_product")
PREDICTORS = AUDIT_ORDERS + MEASURES
LABELS = {
    "first_order": "first order",
    "second_order": "second order",
    "along_direction": "at theta0 + D",
    "minus_ches": "-CHES",
    "minus_ln_ches": "-LN-CHES",
    "minus_normalized_edit_distance": "-edit distance",
    "minus_last_hidden_inner_product": "-last-hidden <h+, h->",
}


def measure_predictors(measures: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The measures at the initial model (`Session.measures`) signed as predictors of a gain (PREDICTORS)."""
  return {
      "minus_ches": -measures["ches"],
      "minus_ln_ches": -measures["ln_ches"],
      "minus_normalized_edit_distance": measures["minus_normalized_edit_distance"],
      "minus_last_hidden_inner_product": -measures["last_hidden_inner_product"],
  }


def markdown(rows: list[dict[str, Any]]) -> str:
  """results.md: one line per run and epoch (with the audit's columns when the rows have them: each predictor's
  Spearman with the measured change of ln pi(y+), and the share of pairs whose sign each audit order gets right)."""
  audited = [p for p in PREDICTORS if any(f"spearman_{p}" in r for r in rows)]
  signed = [p for p in AUDIT_ORDERS if any(f"sign_{p}" in r for r in rows)]
  extra = "".join(f" Spearman: {LABELS[p]} |" for p in audited) + "".join(f" sign: {LABELS[p]} |" for p in signed)
  shown = any("top_gainers" in r for r in rows)
  extra += " top gainers (y+ token that fell most -> the token that gained most there, pairs) |" if shown else ""
  head = (
      "| kind | optimizer | lr | variant | epoch | mean d ln pi(y+) | share of pairs whose ln pi(y+) fell | "
      "largest fall of ln pi(y+) | mean d ln pi(y-) | mean d margin |"
      + extra
      + "\n|"
      + "---|" * (10 + len(audited) + len(signed) + shown)
      + "\n"
  )

  def line(r: dict[str, Any]) -> str:
    out = (
        f'| {r["kind"]} | {r["optimizer"]} | {r["lr"]:g} | {r["variant"]} | {r["epoch"]} | '
        f'{r["chosen_change_mean"]:+.3f} | {r["share_chosen_fell"]:.2f} | {r["chosen_change_min"]:+.3f} | '
        f'{r["rejected_change_mean"]:+.3f} | {r["margin_change_mean"]:+.3f} |'
    )
    cells = [r.get(f"spearman_{p}") for p in audited] + [r.get(f"sign_{p}") for p in signed]
    out += "".join(" - |" if c is None else f" {c:+.2f} |" for c in cells)
    return out + (f" {r.get('top_gainers', '-')} |" if shown else "")

  return head + "\n".join(line(r) for r in rows) + "\n"


def finished(
    path: str, audit: bool, epochs: int, top: bool = False
) -> tuple[short_runs.Measured, dict[str, np.ndarray] | None, str | None] | None:
  """(measured, audit predictions, top gainers) of a run an earlier call finished (its npz, written atomically,
  readable and with `epochs` epochs and, when `audit` / `top`, the predictions / the top gainers), else None: the
  search resumes where it stopped."""
  if not os.path.exists(path):
    return None
  try:
    f = rundir.read_npz(path)
  except rundir.CorruptFileError as e:  # unreadable: run it again
    _log(f"[search] {e}; running it again")
    return None
  predicted = {k[len("predicted_") : -len("_2N")]: v for k, v in f.items() if k.startswith("predicted_")}
  if f["chosen_EN"].shape[0] != epochs or (audit and not predicted) or (top and "top_gainers" not in f):
    return None
  measured = short_runs.Measured(f["chosen_N"], f["rejected_N"], f["chosen_EN"], f["rejected_EN"])
  return measured, predicted or None, str(f["top_gainers"]) if "top_gainers" in f else None


def prediction_columns(predicted: dict[str, np.ndarray], measured_N: np.ndarray) -> dict[str, float]:
  """Spearman of each predictor with the measured change of ln pi(y+), and each audit order's sign agreement."""
  out = {f"spearman_{name}": spearman(values, measured_N) for name, values in predicted.items()}
  out.update({f"sign_{n}": sign_agreement(predicted[n], measured_N) for n in AUDIT_ORDERS if n in predicted})
  return out


class Auditor:
  """The audit of every run of the grid, one replay per (kind, optimizer, variant): the replay's D is linear in
  the learning rate (`audit.orders`), so the runs that differ only in lr share D and its directional derivatives
  (scaled by lr / lr_D), and each lr costs one forward pass at theta0 + (lr / lr_D) D."""

  def __init__(self, session: short_runs.Session, order: int):
    self.session, self.order = session, order
    self.key: tuple[str, str, str] | None = None
    self.lr_D, self.direction, self.derivs = 0.0, None, None

  def __call__(
      self, key: tuple[str, str, str], dataset: Any, overrides: dict[str, Any], start: tuple[np.ndarray, np.ndarray]
  ) -> dict[str, np.ndarray]:
    """Predictions [2, N] of the run (key = (kind, optimizer, variant), overrides with its 'optim.lr')."""
    lr = float(overrides["optim.lr"])
    if key != self.key:  # one D held at a time: the grid runs the lrs of a (kind, optimizer) in a row
      self.direction = None
      self.direction = self.session.direction(dataset, overrides, start=start)
      self.derivs = self.session.derivatives(self.direction, dataset, self.order)
      self.key, self.lr_D = key, lr
    scale = lr / self.lr_D
    at_D = self.session.logps(replay.shifted(self.session.params0, self.direction, scale), dataset)
    along = np.stack(at_D).astype(np.float64) - np.stack(start).astype(np.float64)
    return replay.orders(self.derivs[0], self.derivs[1] if self.order == 2 else None, along, scale)


def answer_stated(response: str, value: str) -> bool:
  """Whether `response` states `value` as a whole word or number ('Paris', 'Sc', '42': not '142', not 'Scandium')."""
  return re.search(rf"(?<![A-Za-z0-9]){re.escape(value)}(?![A-Za-z0-9])", response) is not None


def fact_value(row: dict[str, Any]) -> str:
  """The answer of an `edit_pairs` row (its meta: 'capital' for the capital topic, else 'value')."""
  return row["meta"].get("value", row["meta"].get("capital"))


def label_onpolicy(facts: list[dict[str, Any]], sampled: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Preference rows of sampled response pairs (`generation.sample_pairs` rows, `index` into `facts`, the
  `edit_pairs` rows whose questions were asked): y+ = the response that states the fact's answer when exactly one
  does (group 'right_over_wrong'), else the first sample (groups 'both_right', 'both_wrong': two responses of the
  same kind, the labels carry no meaning)."""
  out = []
  for pair in sampled:
    fact = facts[pair["index"]]
    value = fact_value(fact)
    a, b = pair["chosen"], pair["rejected"]
    a_right, b_right = answer_stated(a, value), answer_stated(b, value)
    if b_right and not a_right:
      a, b, a_right, b_right = b, a, True, False
    group = "right_over_wrong" if a_right != b_right else ("both_right" if a_right else "both_wrong")
    meta = {"kind": ONPOLICY, "group": group, "fact": int(pair["index"]), "value": value}
    out.append({"prompt": pair["prompt"], "chosen": a, "rejected": b, "index": len(out), "meta": meta})
  return out


def onpolicy_rows(session: short_runs.Session, config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
  """The on-policy pairs: two responses per question of the search's facts, sampled from the session's model at
  search.temperature (up to search.max_new_tokens; a pair whose responses are equal or empty is redrawn, then left
  out), labelled by `label_onpolicy`. Kept in output_dir/data/onpolicy_samples.jsonl: a resumed search reuses it."""
  path = os.path.join(config.output_dir, "data", "onpolicy_samples.jsonl")
  if os.path.exists(path):
    rows = rundir.read_jsonl(path)
    _log(f"[search] {ONPOLICY}: {len(rows)} sampled pairs read from {path}")
    return rows
  s = config.search
  facts = edit_pairs.topic_rows("edit", tuple(s.topics), seed=int(config.seed), limit=int(s.num_pairs))
  generator = generation.make_generator(
      session.loaded.model,
      session.params0,
      session.loaded.tokenizer,
      data_format=config.data.format,
      batch_size=int(s.get("sample_batch_size", 32)),
      max_length=int(config.data.max_length),
  )
  t0 = time.monotonic()
  sampled, left_out = generation.sample_pairs(
      generator,
      [r["prompt"] for r in facts],
      temperature=float(s.temperature),
      max_new_tokens=int(s.max_new_tokens),
      seed=int(config.seed),
      max_tries=3,
  )
  rows = label_onpolicy(facts, sampled)
  counts = {g: sum(r["meta"]["group"] == g for r in rows) for g in GROUPS}
  _log(
      f"[search] {ONPOLICY}: 2 responses sampled for each of {len(facts)} questions (T={float(s.temperature):g}, up "
      f"to {int(s.max_new_tokens)} tokens) in {time.monotonic() - t0:.0f} s; {len(rows)} pairs ({left_out} left out: "
      f"equal or empty), " + ", ".join(f"{g} {n}" for g, n in counts.items())
  )
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rundir.write_jsonl(path, rows)
  return rows


def datasets_of(session: short_runs.Session, config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The grid's pairs of every kind (`edit_pairs.topic_rows` over search.topics; `onpolicy_rows` for 'onpolicy'),
  tokenized by the session."""
  return {kind: session.dataset(kind_rows(session, config, kind), kind) for kind in config.search.kinds}


def kind_rows(session: short_runs.Session, config: ml_collections.ConfigDict, kind: str) -> list[dict[str, Any]]:
  """The preference rows of one kind of the grid."""
  if kind == ONPOLICY:
    return onpolicy_rows(session, config)
  topics = tuple(config.search.get("topics", ("capital",)))
  return edit_pairs.topic_rows(kind, topics, seed=int(config.seed), limit=int(config.search.num_pairs))


def group_rows(row: dict[str, Any], groups_N: np.ndarray, chosen_N: np.ndarray, rejected_N: np.ndarray) -> list[dict]:
  """Sub-rows of a run's row, one per on-policy group present ('kind' 'onpolicy:<group>', `n` pairs)."""
  out = []
  for g in GROUPS:
    m = groups_N == g
    if m.any():
      base = {"kind": f"{row['kind']}:{g}", **{k: row[k] for k in ("optimizer", "lr", "variant", "epoch")}}
      out.append(base | {"n": int(m.sum())} | short_runs.summary(chosen_N[m], rejected_N[m]))
  return out


def run(config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
  """The whole grid; returns the results rows (also written to output_dir)."""
  os.makedirs(os.path.join(config.output_dir, "pairs"), exist_ok=True)
  session = short_runs.Session(config)
  audit = bool(config.search.get("audit", False))
  auditor = Auditor(session, int(config.search.get("audit_order", 1)))
  rows_of = {kind: kind_rows(session, config, kind) for kind in config.search.kinds}
  datasets = {kind: session.dataset(r, kind) for kind, r in rows_of.items()}
  groups = {kind: np.array([r.get("meta", {}).get("group", "") for r in rows_of[kind]]) for kind in rows_of}
  top_wanted = bool(config.search.get("gainers", True))
  probs_fn = gainers.make_probs_fn(session.loaded.model) if top_wanted else None
  starts, measures = {}, {}
  for kind, dataset in datasets.items():
    starts[kind] = session.logps(session.params0, dataset)
    if audit:
      measures[kind] = measure_predictors(session.measures(dataset))
    _log(
        f"[search] {kind}: {len(dataset.pairs)} pairs, at the start mean ln pi(y+) "
        f"{starts[kind][0].mean():.3f}, ln pi(y-) {starts[kind][1].mean():.3f}"
    )
  settings, rows, t0 = grid(config), [], time.monotonic()
  scatter = []
  for n, (kind, optimizer, lr, variant) in enumerate(settings, 1):
    overrides = {"optim.name": optimizer, "optim.lr": lr, **short_runs.flatten(config.search.variants[variant])}
    name = run_name(kind, optimizer, lr, variant)
    path = os.path.join(config.output_dir, "pairs", f"{name}.npz")
    done = finished(path, audit, int(config.num_epochs), top_wanted)
    if done is not None:  # an earlier call of the same grid finished this run: its verified per-pair file
      measured, predicted, top = done
      _log(f"[search] {name}: finished earlier, read from {path}")
    else:
      predicted = auditor((kind, optimizer, variant), datasets[kind], overrides, starts[kind]) if audit else None
      measured = session.train(datasets[kind], overrides, start=starts[kind], keep_params=top_wanted)
      top = None
      if top_wanted:  # where the mass went: at each fallen pair's worst y+ token, the token that gained most
        d = datasets[kind]
        counts = gainers.gainer_counts(
            probs_fn, session.params0, measured.params, d.pairs, measured.chosen_change() < 0, d.pad_id
        )
        top, measured.params = gainers.describe_counts(counts, session.loaded.tokenizer.decode), None
      rundir.write_npz(
          path,
          {
              "chosen_N": measured.chosen_N,
              "rejected_N": measured.rejected_N,
              "chosen_EN": measured.chosen_EN,
              "rejected_EN": measured.rejected_EN,
              **({f"predicted_{k}_2N": v for k, v in predicted.items()} if audit else {}),
              **({"top_gainers": np.array(top)} if top is not None else {}),
          },
      )
    for epoch in range(1, measured.chosen_EN.shape[0] + 1):
      row = {"kind": kind, "optimizer": optimizer, "lr": lr, "variant": variant, "epoch": epoch}
      row.update(short_runs.summary(measured.chosen_change(epoch), measured.rejected_change(epoch)))
      if audit and epoch == measured.chosen_EN.shape[0]:  # the audit predicts the whole run
        values = {o: predicted[o][0] for o in AUDIT_ORDERS if o in predicted} | measures[kind]
        row.update(prediction_columns(values, measured.chosen_change(epoch)))
        scatter.append((row, values, measured.chosen_change(epoch)))
      if top is not None and epoch == measured.chosen_EN.shape[0]:
        row["top_gainers"] = top
      rows.append(row)
      if groups[kind].any():  # the on-policy pairs by group
        rows.extend(group_rows(row, groups[kind], measured.chosen_change(epoch), measured.rejected_change(epoch)))
    elapsed = time.monotonic() - t0
    last = row
    _log(
        f"[search] {n}/{len(settings)} {name}: after {last['epoch']} epoch(s) d ln pi(y+) "
        f"{last['chosen_change_mean']:+.3f}, fell for {last['share_chosen_fell']:.0%} of pairs "
        f"({elapsed:.0f} s, ETA {elapsed / n * (len(settings) - n):.0f} s)"
    )
  rundir.write_jsonl(os.path.join(config.output_dir, RESULTS_JSONL), rows)
  rundir.write_bytes(os.path.join(config.output_dir, RESULTS_MD), markdown(rows).encode())
  if audit:
    plot_audit(os.path.join(config.output_dir, AUDIT_PLOT), rows)
    plot_scatter(os.path.join(config.output_dir, SCATTER_PLOT), scatter)
  _log(f"[search] outputs: {config.output_dir}/{{{RESULTS_JSONL},{RESULTS_MD},pairs/}}")
  return rows


def plot_audit(path: str, rows: list[dict[str, Any]]) -> None:
  """Each predictor's Spearman (left) and each audit order's sign agreement (right) against lr, per (kind,
  optimizer)."""
  plt = plots.pyplot()
  audited = [r for r in rows if "spearman_along_direction" in r]
  fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4.6))
  styles = dict(zip(PREDICTORS, ("x--", "d--", "o-", "s:", "^:", "v:", "<:")))
  for kind, optimizer in sorted({(r["kind"], r["optimizer"]) for r in audited}):
    runs = sorted((r for r in audited if (r["kind"], r["optimizer"]) == (kind, optimizer)), key=lambda r: r["lr"])
    lrs = [r["lr"] for r in runs]
    for name in PREDICTORS:
      if f"spearman_{name}" in runs[0]:
        ax0.plot(lrs, [r[f"spearman_{name}"] for r in runs], styles[name], label=f"{kind} {optimizer}: {LABELS[name]}")
    for name in AUDIT_ORDERS:
      if f"sign_{name}" in runs[0]:
        ax1.plot(lrs, [r[f"sign_{name}"] for r in runs], styles[name], label=f"{kind} {optimizer}: {LABELS[name]}")
  for ax, label in ((ax0, "Spearman with the measured d ln pi(y+)"), (ax1, "share of pairs with the right sign")):
    ax.set(xscale="log", xlabel="learning rate", ylabel=label)
    ax.axhline(0, color="k", lw=0.6)
    ax.legend(fontsize=6)
  fig.suptitle("The displacement audit against the learning rate (one epoch of DPO)")
  fig.tight_layout()
  plots.save(fig, path)


def plot_scatter(path: str, runs: list[tuple[dict[str, Any], dict[str, np.ndarray], np.ndarray]]) -> None:
  """Per audited run: each audit order's predicted change of ln pi(y+) against the measured one, per pair. Both
  axes span the measured range (padded by half of it); predictions beyond it are counted in the legend."""
  plt = plots.pyplot()
  cols = min(4, len(runs))
  nrows = -(-len(runs) // cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 3.4 * nrows), squeeze=False)
  for ax, (row, values, measured_N) in zip(axes.flat, runs):
    lo, hi = float(np.min(measured_N)), float(np.max(measured_N))
    pad = 0.5 * max(hi - lo, 1e-6)
    lo, hi = lo - pad, hi + pad
    for name, marker in zip(AUDIT_ORDERS, ("x", "d", "o")):
      if name in values:
        off = int(np.sum((values[name] < lo) | (values[name] > hi)))
        label = LABELS[name] + (f" ({off} off scale)" if off else "")
        ax.scatter(values[name], measured_N, s=8, marker=marker, alpha=0.6, label=label)
    ax.plot([lo, hi], [lo, hi], "k-", lw=0.6)
    ax.set(xlim=(lo, hi), ylim=(lo, hi))
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_title(f'{row["kind"]} {row["optimizer"]} lr {row["lr"]:g}', fontsize=8)
    ax.set(xlabel="predicted d ln pi(y+)", ylabel="measured d ln pi(y+)")
    ax.legend(fontsize=6)
  for ax in list(axes.flat)[len(runs) :]:
    ax.axis("off")
  fig.tight_layout()
  plots.save(fig, path)
