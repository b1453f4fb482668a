r"""Audit CLI: before training, predict per pair how the configured run moves ln pi(y+) and ln pi(y-) (a leaf).

    python -m displacement_jax.audit --config=configs/dpo_tiny.py
    python -m displacement_jax.audit --config=configs/dpo.py --config.data.path=my_pairs.jsonl --config.optim.lr=1e-6

It takes the config `train` takes (model, data, objective, beta, optimizer, lr, batch size, epochs, seed) and runs
the replay route of the displacement audit (displacement_jax/audit/replay.py): the run's batches replayed at the
initial parameters through its optimizer, the updates summed into D; per pair the first-order change
<grad ln pi, D>, the second-order change (+ D^T H D / 2; `audit.order` 1 skips it) and the change of the model
at theta0 + D. A pair is flagged when the model at theta0 + D puts
its ln pi(y+) below the start (the order that followed the measured falls on the real model: docs/results.md).

Outputs in `output_dir`: audit.jsonl (one row per pair, dataset order: its 0-based `row`, `index`, the predicted
changes of ln pi(y+) and ln pi(y-) by order, `flag`) and audit_summary.json; the `audit.top_k` pairs predicted
to fall most are printed with excerpts.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Sequence

import ml_collections
import numpy as np

from displacement_jax import rundir, runtime, sharding

from displacement_jax.config import flags as cli

from displacement_jax.config import checks as config_checks
from displacement_jax.data import schema
from displacement_jax.experiments import short_runs

ROWS_FILE, SUMMARY_FILE = "audit.jsonl", "audit_summary.json"
TOP_K = 10


def _log(msg: str) -> None:
  print(msg, flush=True)


def excerpt(text: Any, n: int = 60) -> str:
  """A one-line excerpt of a prompt or response (chat messages: the last one's content)."""
  s = text if isinstance(text, str) else (text[-1]["content"] if text else "")
  s = " ".join(str(s).split())
  return s if len(s) <= n else s[: n - 3] + "..."


def pair_rows(pred: dict[str, np.ndarray], dataset: runtime.Dataset) -> list[dict[str, Any]]:
  """audit.jsonl: per pair the predictions of each order for y+ and y-, and the flag (at theta0 + D, y+ falls)."""
  rows = []
  for i, pair in enumerate(dataset.pairs):
    row = {"row": i, "index": int(pair.index)}
    for order in (o for o in ("first_order", "second_order", "along_direction", "curvature") if o in pred):
      row[f"chosen_{order}"] = float(pred[order][0, i])
      row[f"rejected_{order}"] = float(pred[order][1, i])
    row["flag"] = bool(pred["along_direction"][0, i] < 0)
    rows.append(row)
  return rows


def summarize(rows: list[dict[str, Any]], config: ml_collections.ConfigDict) -> dict[str, Any]:
  first = np.array([r["chosen_first_order"] for r in rows])
  along = np.array([r["chosen_along_direction"] for r in rows])
  return {
      "num_pairs": len(rows),
      "optimizer": str(config.optim.name),
      "lr": float(config.optim.lr),
      "batch_size": int(config.batch_size),
      "num_epochs": int(config.num_epochs),
      "objective": str(config.loss.objective),
      "chosen_first_order_mean": float(first.mean()),
      **(
          {"chosen_second_order_mean": float(np.mean([r["chosen_second_order"] for r in rows]))}
          if rows and "chosen_second_order" in rows[0]
          else {}
      ),
      "chosen_along_direction_mean": float(along.mean()),
      "share_flagged": float(np.mean(along < 0)),
      "share_first_order_falls": float(np.mean(first < 0)),
  }


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Audit the run `config` would make; returns the summary (written with the per-pair rows to output_dir)."""
  config_checks.check_train(config)
  if int(config.num_steps) > 0:
    raise ValueError("config.num_steps > 0: the audit replays whole epochs; set num_epochs instead (num_steps=0)")
  os.makedirs(config.output_dir, exist_ok=True)
  session = short_runs.Session(config)
  dataset = runtime.load_data(config, session.loaded.tokenizer, session.loaded.model_config.vocab_size)
  _log(
      f"[audit] {len(dataset.pairs)} pairs of {config.data.path}; the run: {config.loss.objective} beta "
      f"{config.loss.beta:g}, {config.optim.name} lr {float(config.optim.lr):g}, batch {config.batch_size}, "
      f"{config.num_epochs} epoch(s)"
  )
  order = int(config.get("audit", {}).get("order", 2))
  rows = pair_rows(session.audit(dataset, {}, order=order), dataset)
  summary = summarize(rows, config)
  rundir.write_jsonl(os.path.join(config.output_dir, ROWS_FILE), rows)
  rundir.write_json(os.path.join(config.output_dir, SUMMARY_FILE), summary)
  n = len(rows)
  _log(
      f"[audit] predicted d ln pi(y+): first order mean {summary['chosen_first_order_mean']:+.4f} (falls for "
      f"{round(summary['share_first_order_falls'] * n)}/{n}); the model at theta0 + D mean "
      f"{summary['chosen_along_direction_mean']:+.4f} (falls for {round(summary['share_flagged'] * n)}/{n}: flagged)"
  )
  examples = {
      int(e.index): e
      for e in schema.load_preference_data(
          config.data.path, split=config.data.get("split") or None, schema=config.data.get("schema", "auto")
      )
  }
  k = min(int(config.get("audit", {}).get("top_k", TOP_K)), n)
  _log(f"[audit] the {k} pairs predicted to fall most (0-based row, index; at theta0 + D, first order):")
  for r in sorted(rows, key=lambda r: r["chosen_along_direction"])[:k]:
    e = examples.get(r["index"])
    text = f" prompt {excerpt(e.prompt)!r} y+ {excerpt(e.chosen, 40)!r}" if e is not None else ""
    _log(
        f"[audit]   row {r['row']} (index {r['index']}): {r['chosen_along_direction']:+.4f}, "
        f"{r['chosen_first_order']:+.4f};{text}"
    )
  _log(f"[audit] outputs: {config.output_dir}/{{{ROWS_FILE},{SUMMARY_FILE}}}")
  return summary


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry: 0, 1 (bad input: one line on stderr) or 2 (bad flags)."""
  flag_values, status = cli.parse_config_flags(
      argv,
      "Displacement audit: per-pair prediction of a configured run, before training",
      prog="displacement_jax.audit",
  )
  if flag_values is None:
    return status
  return cli.one_line_errors(sharding.reporting_failures(lambda: run(flag_values.config)))


if __name__ == "__main__":
  sys.exit(main())
