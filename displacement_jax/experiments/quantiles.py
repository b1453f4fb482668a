"""Section 5: CHES identifies the samples that displace the preferred response most.

Plan (`quantiles_plan`): score N preference pairs (UltraFeedback / AlpacaFarm) under the initial model with each
measure in `MEASURES`; for each quantile q in `QUANTILES` take the `window`-sample window of the ascending-sorted
scores centred at round(q (N-1)) (`filtering.quantile_window`); train DPO (beta 0.1, RMSprop lr 1e-7,
batch 32, 1 epoch) on the window only and record the mean change of the preferred log-prob over it;
repeat over seeds and report mean / min / max over seeds (Figure 2, `results.aggregate`).

`run(config)` is the pipeline (`config.main = 'quantiles'`, configs/ches_quantiles.py; an entry point that nothing
imports); one call trains one (measure, q, seed) or, with `quantiles.measure='all'` / `quantiles.q=-1`, every
combination in turn. Per-example scores are computed once and cached beside the runs
(`<sweep dir>/scores*_<hash>.npz`), so a sweep shares them. Each trained subset writes `result.json` (read by
`python -m displacement_jax.report quantiles`).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Sequence

import ml_collections
import numpy as np

from displacement_jax import rundir, runtime
from displacement_jax.score import core as scoring
from displacement_jax.train import loop as training
from displacement_jax.data import schema
from displacement_jax.experiments import common, quantiles_plan, results


def scores_cache_path(config: ml_collections.ConfigDict) -> str:
  """Where the per-example scores are cached, shared by every run of a sweep (`<parent of output_dir>`).

  The file name carries a hash of everything the scores depend on (data, row sample, model, tokenization)
  so unrelated runs under the same parent never share a cache. With `data.add_special_tokens` the new
  embeddings are initialised from `config.seed` (as in training), so the cache is also per seed: CHES is
  computed under exactly the model that is then trained (the official code initialised them differently
  for scoring and training).
  """
  qc, dc, mc = config.quantiles, config.data, config.model
  special = bool(dc.get("add_special_tokens"))
  key = json.dumps(
      [
          dc.path,
          dc.get("split"),
          int(dc.get("limit", 0)),
          int(qc.num_rows),
          int(qc.get("sample_seed", 0)),
          mc.get("path"),
          mc.get("tiny"),
          int(mc.get("seed", 0)),
          mc.get("tokenizer"),
          mc.get("dtype"),
          int(dc.max_length),
          dc.format,
          special,
          int(config.seed) if special else None,
      ]
  )
  digest = hashlib.sha256(key.encode()).hexdigest()[:12]
  directory = qc.get("scores_dir") or os.path.dirname(os.path.abspath(config.output_dir))
  suffix = f"_seed{int(config.seed)}" if special else ""
  return os.path.join(directory, f"scores{suffix}_{digest}.npz")


def compute_scores(config: ml_collections.ConfigDict, examples: Sequence[Any]) -> dict[str, np.ndarray]:
  """{measure: [N] scores} of `examples` under the initial model (scoring.score_examples), cached on disk.

  The cache is reused only when it holds the same dataset rows (their `index`) in the same order.
  """
  path = scores_cache_path(config)
  index = np.asarray([int(getattr(e, "index", i)) for i, e in enumerate(examples)], np.int64)
  cached = read_scores_cache(path)
  if (
      cached is not None
      and np.array_equal(cached.get("index"), index)
      and all(m in cached for m in quantiles_plan.MEASURES)
  ):
    print(f"quantiles: reusing scores from {path}", flush=True)
    return {m: np.asarray(cached[m], np.float64) for m in quantiles_plan.MEASURES}

  loaded = runtime.load_model(config)
  scored = scoring.score_examples(
      loaded.model,
      loaded.params,
      config,
      loaded.tokenizer,
      examples,
      batch_size=int(config.batch_size),
  )
  scores = {m: np.asarray([r[m] for r in scored], np.float64) for m in quantiles_plan.MEASURES}
  rundir.write_npz(path, {"index": index, **scores})
  return scores


def read_scores_cache(path: str) -> dict[str, np.ndarray] | None:
  """The arrays of a scores cache, or None when there is none or it is corrupt (said in one line naming it)."""
  if not os.path.exists(path):
    return None
  try:
    return rundir.read_npz(path)
  except rundir.CorruptFileError as e:
    print(f"quantiles: the scores cache {e}; scoring again", flush=True)
    return None


def train_subset(
    config: ml_collections.ConfigDict,
    examples: Sequence[Any],
    positions: np.ndarray,
    measure: str,
    q: float,
    seed: int,
    output_dir: str,
) -> dict[str, Any]:
  """Train on examples[positions]; write and return the result.json row of (measure, q, seed).

  The monitor covers the whole subset (eval.max_samples = its size): its mean is the reported change.
  """

  subset = [examples[int(i)] for i in positions]
  data_path = schema.write_jsonl(os.path.join(output_dir, "subset.jsonl"), subset)
  result = training.run(
      common.train_config(
          config, data_path, output_dir, {"seed": int(seed), "eval.max_samples": len(subset)}, n_rows=len(subset)
      )
  )
  mon = result.monitor
  row = {
      "family": "quantiles",
      "measure": measure,
      "q": float(q),
      "seed": int(seed),
      "n": len(subset),
      "preferred_logprob_change": float(mon["monitor/preferred_logprob_change"]),
      "dispreferred_logprob_change": float(mon["monitor/dispreferred_logprob_change"]),
      "share_preferred_fell": float(mon["monitor/share_preferred_fell"]),
      "steps": int(result.step),
      "dataset_rows": [int(getattr(e, "index", i)) for i, e in zip(positions, subset)],
  }
  rundir.write_json(os.path.join(output_dir, common.RESULT_FILE), row)
  return row


def load_examples(config: ml_collections.ConfigDict) -> list[Any]:
  """The scored rows: `quantiles.num_rows` rows of the dataset drawn with `quantiles.sample_seed`."""
  qc = config.quantiles
  examples = schema.load_preference_data(
      config.data.path, split=config.data.get("split", "train"), limit=int(config.data.limit) or None
  )
  rows = quantiles_plan.sample_rows(len(examples), int(qc.num_rows), int(qc.get("sample_seed", 0)))
  return [examples[int(i)] for i in rows]


def run(config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
  """The Section 5 pipeline for `config.quantiles` (see module docstring); returns the result rows."""

  qc = config.quantiles
  measures = tuple(qc.get("measures") or quantiles_plan.MEASURES) if qc.measure == "all" else (qc.measure,)
  for m in measures:
    quantiles_plan.check_measure(m)
  quantiles = tuple(qc.get("quantiles") or quantiles_plan.QUANTILES) if float(qc.q) < 0 else (float(qc.q),)
  seeds = tuple(qc.seeds) if qc.get("seeds") else (int(config.seed),)
  examples = load_examples(config)
  window = min(int(qc.window), len(examples))
  single = len(measures) * len(quantiles) * len(seeds) == 1
  rows = []
  for seed in seeds:
    # per seed only when new-token embeddings depend on it (scores_cache_path)
    scores = compute_scores(common.derive(config, {"seed": int(seed)}), examples)
    for (measure, q), positions in quantiles_plan.plan({m: scores[m] for m in measures}, quantiles, window).items():
      out_dir = config.output_dir if single else os.path.join(config.output_dir, f"{measure}_q{q:g}_seed{seed}")
      rows.append(train_subset(config, examples, positions, measure, q, seed, out_dir))
  schema.write_jsonl(
      os.path.join(config.output_dir, common.RESULTS_FILE),
      [{k: v for k, v in r.items() if k != "dataset_rows"} for r in rows],
  )
  for row in results.aggregate(rows):
    print(
        f'{row["measure"]:34s} q={row["q"]:.2f}  preferred log-prob change {row["mean"]:+.4f} '
        f'[{row["min"]:+.4f}, {row["max"]:+.4f}] over {row["n_seeds"]} seed(s)',
        flush=True,
    )
  return rows
