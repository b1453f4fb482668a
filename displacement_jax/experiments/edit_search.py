"""Where does DPO displace a real model? A grid over pair kinds, optimizers, learning rates, epochs and objectives.

    python -m displacement_jax.train --config=configs/edit_search.py            # SmolLM2-135M-Instruct, ~40 min
    python -m displacement_jax.train --config=configs/edit_search.py:tiny       # the tiny random Llama (tests)

For every (kind, optimizer, lr, variant) of `config.search` one short run (`short_runs.Session.train`, the
batches and train step of `train.run`) trains the kind's pairs (`edit_pairs.rows`) from the initial model and
measures ln pi(y+) and ln pi(y-) of every pair after each epoch. One model load serves the whole grid.

Outputs in output_dir: results.jsonl (one row per run and epoch: the setting and `short_runs.summary`'s
columns), results.md (the same as a table), pairs/<run>.npz (per-pair log-probs at the start and per epoch).
"""

from __future__ import annotations

import itertools
import json
import os
import time
from typing import Any

import ml_collections
import numpy as np

from displacement_jax.experiments import edit_pairs, short_runs

RESULTS_JSONL, RESULTS_MD = "results.jsonl", "results.md"
COLUMNS = ("kind", "optimizer", "lr", "variant", "epoch", "chosen_change_mean", "share_chosen_fell")


def _log(msg: str) -> None:
  print(msg, flush=True)


def grid(config: ml_collections.ConfigDict) -> list[tuple[str, str, float, str]]:
  """(kind, optimizer, lr, variant name) of every run, in the order they run."""
  s = config.search
  return list(itertools.product(s.kinds, s.optimizers, [float(x) for x in s.lrs], list(s.variants)))


def run_name(kind: str, optimizer: str, lr: float, variant: str) -> str:
  return f"{kind}_{optimizer}_lr{lr:g}_{variant}".replace("+", "_")


def markdown(rows: list[dict[str, Any]]) -> str:
  """results.md: one line per run and epoch."""
  head = (
      "| kind | optimizer | lr | variant | epoch | mean d ln pi(y+) | share of pairs whose ln pi(y+) fell | "
      "largest fall of ln pi(y+) | mean d ln pi(y-) | mean d margin |\n|---|---|---|---|---|---|---|---|---|---|\n"
  )
  lines = [
      f'| {r["kind"]} | {r["optimizer"]} | {r["lr"]:g} | {r["variant"]} | {r["epoch"]} | '
      f'{r["chosen_change_mean"]:+.3f} | {r["share_chosen_fell"]:.2f} | {r["chosen_change_min"]:+.3f} | '
      f'{r["rejected_change_mean"]:+.3f} | {r["margin_change_mean"]:+.3f} |'
      for r in rows
  ]
  return head + "\n".join(lines) + "\n"


def run(config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
  """The whole grid; returns the results rows (also written to output_dir)."""
  os.makedirs(os.path.join(config.output_dir, "pairs"), exist_ok=True)
  session = short_runs.Session(config, log=_log)
  datasets, starts = {}, {}
  for kind in config.search.kinds:
    datasets[kind] = session.dataset(
        edit_pairs.rows(kind, seed=int(config.seed), limit=int(config.search.num_pairs)), kind
    )
    starts[kind] = session.logps(session.params0, datasets[kind])
    _log(
        f"[search] {kind}: {len(datasets[kind].pairs)} pairs, at the start mean ln pi(y+) "
        f"{starts[kind][0].mean():.3f}, ln pi(y-) {starts[kind][1].mean():.3f}"
    )
  settings, rows, t0 = grid(config), [], time.monotonic()
  for n, (kind, optimizer, lr, variant) in enumerate(settings, 1):
    overrides = {"optim.name": optimizer, "optim.lr": lr, **short_runs.flatten(config.search.variants[variant])}
    measured = session.train(datasets[kind], overrides, start=starts[kind])
    name = run_name(kind, optimizer, lr, variant)
    np.savez(
        os.path.join(config.output_dir, "pairs", f"{name}.npz"),
        chosen_N=measured.chosen_N,
        rejected_N=measured.rejected_N,
        chosen_EN=measured.chosen_EN,
        rejected_EN=measured.rejected_EN,
    )
    for epoch in range(1, measured.chosen_EN.shape[0] + 1):
      row = {"kind": kind, "optimizer": optimizer, "lr": lr, "variant": variant, "epoch": epoch}
      row.update(short_runs.summary(measured.chosen_change(epoch), measured.rejected_change(epoch)))
      rows.append(row)
    elapsed = time.monotonic() - t0
    last = rows[-1]
    _log(
        f"[search] {n}/{len(settings)} {name}: after {last['epoch']} epoch(s) d ln pi(y+) "
        f"{last['chosen_change_mean']:+.3f}, fell for {last['share_chosen_fell']:.0%} of pairs "
        f"({elapsed:.0f} s, ETA {elapsed / n * (len(settings) - n):.0f} s)"
    )
  with open(os.path.join(config.output_dir, RESULTS_JSONL), "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  with open(os.path.join(config.output_dir, RESULTS_MD), "w") as f:
    f.write(markdown(rows))
  _log(f"[search] outputs: {config.output_dir}/{{{RESULTS_JSONL},{RESULTS_MD},pairs/}}")
  return rows
