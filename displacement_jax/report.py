r"""Tables and figures of the three experiment families from their run directories.

    python -m displacement_jax.report persona runs/persona_olmo1b/dpo-0 runs/persona_olmo1b/dpo-1 [--out DIR]
    python -m displacement_jax.report quantiles runs/quantiles_uf_olmo1b [--out DIR]
    python -m displacement_jax.report sorry runs/sorry_llama3_8b_instruct [--out DIR]

Every `result.json` below the given directories (searched recursively) with the family's name is read:
- persona: Table 1/2/3-style rows (mean largest drop of pi(y+), start -> min and end, benign and
  catastrophic gainers over seeds) and Table 13 (unembedding metrics at start and end); one plot of
  pi(y+) per step for each setting, from each seed's metrics.jsonl (`persona_<setting>.png`).
- quantiles: Figure 2, the mean preferred log-prob change per quantile, one line per measure, min/max
  bars over seeds (`quantiles.png`, table printed).
- sorry: Figure 3, refusal rates before training and after each method, train and test prompts
  (`sorry_refusal.png`, table printed).
Plots go to --out (default: the first directory). Functions return the rows so tests and notebooks can
use them without the CLI.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import sys
from typing import Any, Iterable, Sequence

import numpy as np

from displacement_jax import plots, rundir
from displacement_jax.config import flags as cli
from displacement_jax.train import metrics as metrics_lib
from displacement_jax.experiments import common, results as results_lib
from displacement_jax.errors import DataError
from displacement_jax.experiments.results import UNEMBEDDING_KEYS

FAMILIES = ("persona", "quantiles", "sorry")
_NUMBER = (int, float)
# The fields each family's tables read from a result.json, and the types they may have.
REQUIRED = {
    "persona": {
        "preferred": str,
        "dispreferred": str,
        "start": _NUMBER,
        "min": _NUMBER,
        "end": _NUMBER,
        "largest_drop": _NUMBER,
    },
    "quantiles": {"measure": str, "q": _NUMBER, "seed": int, "preferred_logprob_change": _NUMBER},
    "sorry": {"initial": dict},
}


def find_results(dirs: Sequence[str], family: str) -> list[dict[str, Any]]:
  """Every result.json of `family` under `dirs` (recursive, sorted paths); each gets a '_dir' key."""
  out = []
  for d in dirs:
    if not os.path.isdir(d):
      raise ValueError(f"run directory {d!r} does not exist")
    for root, _, files in sorted(os.walk(d)):
      if common.RESULT_FILE in files:
        path = os.path.join(root, common.RESULT_FILE)
        row = rundir.read_json(path)
        if isinstance(row, dict) and row.get("family") == family:
          check_result(path, row, family)
          row["_dir"] = root
          out.append(row)
  if not out:
    raise ValueError(f"no {family} result.json under {list(dirs)} (did the pipeline finish?)")
  return out


def check_result(path: str, row: dict[str, Any], family: str) -> None:
  """DataError naming the file and the field when a result.json lacks a field its family's tables read, or holds
  a value of another type (an SFT-phase persona result is not tabulated: not checked)."""
  if family == "persona" and row.get("phase") == "sft":
    return
  for field, kind in REQUIRED[family].items():
    if field not in row:
      raise DataError(path, None, field, "missing (written by an unfinished or older pipeline?)")
    value = row[field]
    if isinstance(value, bool) or not isinstance(value, kind):
      want = "a number" if kind is _NUMBER else f"a {kind.__name__}"
      raise DataError(path, None, field, f"must be {want}, got {value!r}")


def _save(fig: Any, path: str) -> str:
  """`fig` as a PNG at `path`, atomically (plots.save); returns path."""
  return plots.save(fig, path, dpi=100)


_plt = plots.pyplot


def _most_common(lists: Iterable[Sequence[str]], n: int = 3) -> list[str]:
  counter = collections.Counter(t for tokens in lists for t in tokens)
  return [t for t, _ in counter.most_common(n)]


# ---------------------------------------------------------------------------------------------- persona


def persona_rows(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """One row per (model, phase, objective, y+, y-): means over seeds of the largest pi(y+) drop etc."""
  groups: dict[tuple, list[dict[str, Any]]] = collections.OrderedDict()
  for r in results:
    if r.get("phase") == "sft":
      continue
    key = (r.get("model", "?"), r.get("phase", "dpo"), r.get("objective", "dpo"), r["preferred"], r["dispreferred"])
    groups.setdefault(key, []).append(r)
  rows = []
  for (model, phase, objective, pos, neg), rs in groups.items():
    row = {
        "model": model,
        "phase": phase,
        "objective": objective,
        "preferred": pos,
        "dispreferred": neg,
        "n_seeds": len(rs),
        "largest_drop": float(np.mean([r["largest_drop"] for r in rs])),
        "start": float(np.mean([r["start"] for r in rs])),
        "min": float(np.mean([r["min"] for r in rs])),
        "end": float(np.mean([r["end"] for r in rs])),
        "benign": _most_common(r.get("benign", []) for r in rs),
        "catastrophic": _most_common(r.get("catastrophic", []) for r in rs),
        "dirs": [r["_dir"] for r in rs],
    }
    for key in UNEMBEDDING_KEYS:
      if all(f"{key}_start" in r for r in rs):
        row[f"{key}_start"] = float(np.mean([r[f"{key}_start"] for r in rs]))
        row[f"{key}_end"] = float(np.mean([r[f"{key}_end"] for r in rs]))
    rows.append(row)
  return rows


def format_persona(rows: Sequence[dict[str, Any]]) -> str:
  lines = [
      "Table 1-style: mean largest drop of pi(y+) over seeds (start -> min, end)",
      f'{"model":28s} {"phase":9s} {"obj":4s} {"y+/y-":14s} {"seeds":>5s} {"drop":>6s} '
      f'{"start->min":>13s} {"end":>6s}  benign gainers | catastrophic gainers',
  ]
  for r in rows:
    lines.append(
        f'{r["model"][-28:]:28s} {r["phase"]:9s} {r["objective"]:4s} '
        f'{r["preferred"] + "/" + r["dispreferred"]:14s} {r["n_seeds"]:5d} {r["largest_drop"]:6.3f} '
        f'{r["start"]:6.3f}->{r["min"]:5.3f} {r["end"]:6.3f}  {", ".join(r["benign"]) or "-"} | '
        f'{", ".join(r["catastrophic"]) or "-"}'
    )
  if any("w_pos_norm_start" in r for r in rows):
    lines += [
        "",
        "Table 13-style: unembedding metrics (start -> end)",
        f'{"y+/y-":14s} ' + " ".join(f"{k:>22s}" for k in UNEMBEDDING_KEYS),
    ]
    for r in rows:
      if "w_pos_norm_start" in r:
        lines.append(
            f'{r["preferred"] + "/" + r["dispreferred"]:14s} '
            + " ".join(f'{r[k + "_start"]:10.4g}->{r[k + "_end"]:<10.4g}' for k in UNEMBEDDING_KEYS)
        )
  return "\n".join(lines)


def plot_persona(rows: Sequence[dict[str, Any]], out_dir: str) -> list[str]:
  """pi(y+) per step for every seed of every setting; returns the PNG paths."""

  plt = _plt()
  paths = []
  for r in rows:
    fig, ax = plt.subplots(figsize=(6, 4))
    for d in r["dirs"]:
      mrows = [m for m in metrics_lib.read_metrics(d) if "monitor/preferred_prob" in m]
      ax.plot(
          [m["step"] for m in mrows], [m["monitor/preferred_prob"] for m in mrows], alpha=0.7, label=os.path.basename(d)
      )
    ax.set_xlabel("training step")
    ax.set_ylabel(f'pi({r["preferred"]} | x)')
    if len(r["dirs"]) <= 10:
      ax.legend(fontsize=7)
    ax.set_title(
        f'{os.path.basename(str(r["model"]))} {r["objective"]} {r["preferred"]}/{r["dispreferred"]}: '
        f'drop {r["largest_drop"]:.2f}'
    )
    fig.tight_layout()
    name = f'persona_{r["phase"]}_{r["objective"]}_{r["preferred"]}_{r["dispreferred"]}.png'
    paths.append(_save(fig, os.path.join(out_dir, name)))
  return paths


# -------------------------------------------------------------------------------------------- quantiles


def quantile_rows(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """One row per (measure, q): mean / min / max over seeds of the preferred log-prob change."""
  return results_lib.aggregate(results)


def format_quantiles(rows: Sequence[dict[str, Any]]) -> str:
  lines = [
      "Figure 2: mean preferred log-prob change on each quantile window [min, max over seeds]",
      f'{"measure":34s} {"q":>5s} {"mean":>10s} {"min":>10s} {"max":>10s} seeds',
  ]
  lines += [
      f'{r["measure"]:34s} {r["q"]:5.2f} {r["mean"]:+10.4f} {r["min"]:+10.4f} {r["max"]:+10.4f} {r["n_seeds"]}'
      for r in rows
  ]
  return "\n".join(lines)


def plot_quantiles(rows: Sequence[dict[str, Any]], path: str) -> str:
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6, 4))
  for measure in dict.fromkeys(r["measure"] for r in rows):
    pts = sorted((r["q"], r["mean"], r["min"], r["max"]) for r in rows if r["measure"] == measure)
    q, mean, lo, hi = (np.array(v) for v in zip(*pts))
    ax.errorbar(q, mean, yerr=[mean - lo, hi - mean], marker="o", capsize=3, label=measure)
  ax.axhline(0.0, color="gray", lw=0.8)
  ax.set_xlabel("quantile of the measure (window centre)")
  ax.set_ylabel("preferred log-prob change")
  ax.set_title("Figure 2: displacement per quantile window")
  ax.legend(fontsize=8)
  fig.tight_layout()
  _save(fig, path)
  return path


# ------------------------------------------------------------------------------------------------ sorry


def sorry_rows(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """One row per (model, method) with train / test refusal rates (method 'initial' = before training)."""
  rows = []
  for r in results:
    model = r.get("model", "?")
    for method, rates in [("initial", r["initial"])] + list(r.get("variants", {}).items()):
      row = {"model": model, "method": method}
      for split in ("train", "test"):
        rate = rates.get(split, {})
        row[split] = rate.get("refusal_rate", float("nan"))
        row[f"{split}_unparsable"] = rate.get("n_unparsable", 0)
        row[f"{split}_n"] = rate.get("n", 0)
      rows.append(row)
  return rows


def format_sorry(rows: Sequence[dict[str, Any]]) -> str:
  lines = [
      "Figure 3: refusal rate (share of T=0.7 responses the judge scores 0), train / test prompts",
      f'{"model":36s} {"method":10s} {"train":>7s} {"test":>7s} {"unparsable (train/test)":>24s}',
  ]
  for r in rows:
    lines.append(
        f'{str(r["model"])[-36:]:36s} {r["method"]:10s} {_pct(r["train"]):>7s} {_pct(r["test"]):>7s} '
        f'{r["train_unparsable"]:>12d}/{r["test_unparsable"]:<11d}'
    )
  return "\n".join(lines)


def format_sorry_logps(results: Sequence[dict[str, Any]]) -> str:
  """ln pi(y+) of the train pairs after each method, by pair kind (pipeline's `train_logps`); '' when absent."""
  lines = []
  for r in results:
    for method, v in r.get("variants", {}).items():
      for kind, m in v.get("train_logps", {}).items():
        lines.append(
            f'{method:10s} {kind:22s} {m["n"]:>4d} {m["chosen_start_mean"]:>10.2f} {m["chosen_change_mean"]:>+9.3f} '
            f'{100 * m["share_chosen_fell"]:>6.0f}% {m["rejected_change_mean"]:>+9.3f} {m["margin_change_mean"]:>+9.3f}'
        )
  if not lines:
    return ""
  header = (
      "ln pi(y+) of the train pairs after each method, by kind (change from the start; fell = share whose ln pi(y+) "
      f'fell)\n{"method":10s} {"kind":22s} {"n":>4s} {"start":>10s} {"d ln y+":>9s} {"fell":>7s} {"d ln y-":>9s} '
      f'{"d margin":>9s}'
  )
  return "\n".join([header] + lines)


def _pct(x: float) -> str:
  return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def plot_sorry(rows: Sequence[dict[str, Any]], path: str) -> str:
  plt = _plt()
  models = list(dict.fromkeys(r["model"] for r in rows))
  fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
  for ax, model in zip(axes[0], models):
    rs = [r for r in rows if r["model"] == model]
    x = np.arange(len(rs))
    for offset, split in ((-0.2, "train"), (0.2, "test")):
      ax.bar(x + offset, [0 if math.isnan(r[split]) else 100 * r[split] for r in rs], width=0.4, label=split)
    ax.set_xticks(x, [r["method"] for r in rs], rotation=20)
    ax.set_ylim(0, 100)
    ax.set_ylabel("refusal rate (%)")
    ax.set_title(os.path.basename(str(model)))
    ax.legend()
  fig.tight_layout()
  _save(fig, path)
  return path


# --------------------------------------------------------------------------------------------------- CLI


def report(family: str, dirs: Sequence[str], out_dir: str | None = None) -> dict[str, Any]:
  """Print the family's tables, write its plots; returns {'rows', 'text', 'plots'}."""
  if family not in FAMILIES:
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
  if not dirs:
    raise ValueError("give at least one run directory")
  results = find_results(dirs, family)
  out_dir = out_dir or dirs[0]
  os.makedirs(out_dir, exist_ok=True)
  if family == "persona":
    rows = persona_rows(results)
    if not rows:
      raise ValueError(f"only SFT-phase persona results under {list(dirs)}: nothing to tabulate")
    text, plots = format_persona(rows), plot_persona(rows, out_dir)
  elif family == "quantiles":
    rows = quantile_rows(results)
    text, plots = format_quantiles(rows), [plot_quantiles(rows, os.path.join(out_dir, "quantiles.png"))]
  else:
    rows = sorry_rows(results)
    logps = format_sorry_logps(results)
    text = format_sorry(rows) + ("\n\n" + logps if logps else "")
    plots = [plot_sorry(rows, os.path.join(out_dir, "sorry_refusal.png"))]
  print(text)
  for p in plots:
    print(f"wrote {p}")
  return {"rows": rows, "text": text, "plots": plots}


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m displacement_jax.report", description=__doc__.split("\n\n")[0])
  parser.add_argument("family", choices=FAMILIES)
  parser.add_argument("dirs", nargs="+", help="run directories (searched recursively for result.json)")
  parser.add_argument("--out", default=None, help="where plots go (default: the first directory)")
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  return cli.one_line_errors(lambda: report(args.family, args.dirs, args.out), (ValueError, KeyError))


if __name__ == "__main__":
  sys.exit(main())
