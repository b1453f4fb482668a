"""Section 5: CHES identifies the samples that displace the preferred response most.

Plan: score N preference pairs (UltraFeedback / AlpacaFarm) under the initial model with each measure in
`MEASURES`; for each quantile q in `QUANTILES` take the `window`-sample window of the ascending-sorted
scores centred at round(q (N-1)) (`filtering.quantile_window`); train DPO (beta 0.1, RMSprop lr 1e-7,
batch 32, 1 epoch) on the window only and record the mean change of the preferred log-prob over it;
repeat over seeds and report mean / min / max over seeds (Figure 2).

`run(config)` is the pipeline (`config.main = 'quantiles'`); one call trains one (measure, q, seed)
or, with `quantiles.measure='all'` / `quantiles.q=-1`, every combination in turn. Per-example scores are
computed once and cached beside the runs (`<sweep dir>/scores*_<hash>.npz`), so a sweep shares them.
Each trained subset writes `result.json` (read by `python -m displacement_jax.report quantiles`).
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from displacement_jax import filtering
from displacement_jax import scoring
from displacement_jax import runtime, training
from displacement_jax.data import schema

MEASURES = ('ches', 'minus_normalized_edit_distance', 'last_hidden_inner_product')
QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)
SEEDS = (0, 1, 2)
WINDOW = 512
RESULT_FILE = 'result.json'
RESULTS_FILE = 'results.jsonl'


def check_measure(measure: str) -> str:
  if measure not in MEASURES:
    raise ValueError(f'quantiles.measure must be one of {MEASURES} or "all", got {measure!r}')
  return measure


def sample_rows(num_total: int, num_rows: int, seed: int = 0) -> np.ndarray:
  """Sorted positions of `num_rows` rows drawn without replacement (all rows when num_rows <= 0 or >= N)."""
  if num_total < 1:
    raise ValueError(f'the dataset is empty (num_total={num_total})')
  if num_rows <= 0 or num_rows >= num_total:
    return np.arange(num_total, dtype=np.int64)
  return np.sort(np.random.default_rng(seed).choice(num_total, size=num_rows, replace=False)).astype(np.int64)


def plan(scores_by_measure: Mapping[str, Sequence[float] | np.ndarray], quantiles: Sequence[float] = QUANTILES,
         window: int = WINDOW) -> dict[tuple[str, float], np.ndarray]:
  """{(measure, q): positions of the training window} for every measure and quantile.

  Positions index the scored rows; the window is centred at round(q (N-1)) of the ascending sort.
  """
  out = {}
  for measure, scores in scores_by_measure.items():
    check_measure(measure)
    for q in quantiles:
      out[(measure, float(q))] = filtering.quantile_window(scores, float(q), window)
  return out


def aggregate(results: Sequence[Mapping[str, Any]], key: str = 'preferred_logprob_change') -> list[dict[str, Any]]:
  """Mean / min / max of `key` over seeds for every (measure, q), sorted by measure order then q.

  Each result needs 'measure', 'q', 'seed' and `key`. Repeated (measure, q, seed) entries raise.
  """
  groups: dict[tuple[str, float], dict[int, float]] = {}
  for i, r in enumerate(results):
    for field in ('measure', 'q', 'seed', key):
      if field not in r:
        raise ValueError(f'result {i} has no field {field!r}: {dict(r)}')
    seeds = groups.setdefault((str(r['measure']), float(r['q'])), {})
    if int(r['seed']) in seeds:
      raise ValueError(f'result {i}: repeated (measure={r["measure"]}, q={r["q"]}, seed={r["seed"]})')
    seeds[int(r['seed'])] = float(r[key])
  order = {m: i for i, m in enumerate(MEASURES)}
  rows = []
  for (measure, q), seeds in sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0][0], kv[0][1])):
    values = np.array([seeds[s] for s in sorted(seeds)], np.float64)
    rows.append({'measure': measure, 'q': q, 'mean': float(values.mean()), 'min': float(values.min()),
                 'max': float(values.max()), 'n_seeds': int(values.size), 'seeds': sorted(seeds)})
  return rows


def measure_order_agreement(rows: Sequence[Mapping[str, Any]], measure: str) -> float:
  """Spearman-style check of the paper's claim: the share of adjacent quantile pairs (q_i < q_j) of
  `measure` whose mean preferred change falls as q grows (1.0 = strictly more displacement at higher q)."""
  pts = sorted((r['q'], r['mean']) for r in rows if r['measure'] == measure)
  if len(pts) < 2:
    raise ValueError(f'need at least two quantiles of {measure!r} to compare, got {len(pts)}')
  return float(np.mean([b[1] < a[1] for a, b in zip(pts, pts[1:])]))


# ------------------------------------------------------------------------------------------------ pipeline


def scores_cache_path(config: Any) -> str:
  """Where the per-example scores are cached, shared by every run of a sweep (`<parent of output_dir>`).

  The file name carries a hash of everything the scores depend on (data, row sample, model, tokenization)
  so unrelated runs under the same parent never share a cache. With `data.add_special_tokens` the new
  embeddings are initialised from `config.seed` (as in training), so the cache is also per seed: CHES is
  computed under exactly the model that is then trained (the official code initialised them differently
  for scoring and training).
  """
  import hashlib  # pylint: disable=g-import-not-at-top

  qc, dc, mc = config.quantiles, config.data, config.model
  special = bool(dc.get('add_special_tokens'))
  key = json.dumps([dc.path, dc.get('split'), int(dc.get('limit', 0)), int(qc.num_rows), int(qc.get('sample_seed', 0)),
                    mc.get('path'), mc.get('tiny'), int(mc.get('seed', 0)), mc.get('tokenizer'), mc.get('dtype'),
                    int(dc.max_length), dc.format, special, int(config.seed) if special else None])
  digest = hashlib.sha256(key.encode()).hexdigest()[:12]
  directory = qc.get('scores_dir') or os.path.dirname(os.path.abspath(config.output_dir))
  suffix = f'_seed{int(config.seed)}' if special else ''
  return os.path.join(directory, f'scores{suffix}_{digest}.npz')


def _write_atomic_npz(path: str, **arrays: np.ndarray) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f'{path}.{os.getpid()}.tmp.npz'
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def compute_scores(config: Any, examples: Sequence[Any]) -> dict[str, np.ndarray]:
  """{measure: [N] scores} of `examples` under the initial model (score.score_examples), cached on disk.

  The cache is reused only when it holds the same dataset rows (their `index`) in the same order.
  """
  path = scores_cache_path(config)
  index = np.asarray([int(getattr(e, 'index', i)) for i, e in enumerate(examples)], np.int64)
  if os.path.exists(path):
    with np.load(path) as f:
      if np.array_equal(f['index'], index) and all(m in f for m in MEASURES):
        print(f'quantiles: reusing scores from {path}', flush=True)
        return {m: np.asarray(f[m], np.float64) for m in MEASURES}

  loaded = runtime.load_model(config)
  results = scoring.score_examples(loaded.model, loaded.params, config, loaded.tokenizer, examples,
                                 batch_size=int(config.batch_size), max_length=int(config.data.max_length),
                                 format=config.data.format, progress=bool(config.get('progress', True)))
  scores = {m: np.asarray([r[m] for r in results], np.float64) for m in MEASURES}
  _write_atomic_npz(path, index=index, **scores)
  return scores




def train_config(config: Any, data_path: str, output_dir: str, seed: int, n_rows: int) -> Any:
  """The train.run config of one subset: the pipeline config's train fields, with the subset as data."""
  tc = copy.deepcopy(config)
  with tc.unlocked():
    tc.main = ''
    tc.data.path = data_path
    tc.data.schema = 'generic'  # the pipeline writes generic preference jsonl, whatever the directory is called
    tc.data.limit = 0
    tc.seed = int(seed)
    tc.output_dir = output_dir
    tc.eval.max_samples = int(n_rows)  # the monitor covers the whole subset: its mean is the reported change
    tc.batch_size = min(int(tc.batch_size), int(n_rows))
  return tc


def train_subset(config: Any, examples: Sequence[Any], positions: np.ndarray, measure: str, q: float, seed: int,
                 output_dir: str) -> dict[str, Any]:
  """Train on examples[positions]; write and return the result.json row of (measure, q, seed)."""

  subset = [examples[int(i)] for i in positions]
  data_path = schema.write_jsonl(os.path.join(output_dir, 'subset.jsonl'), subset)
  result = training.run(train_config(config, data_path, output_dir, seed, len(subset)))
  mon = result.monitor
  row = {
      'family': 'quantiles', 'measure': measure, 'q': float(q), 'seed': int(seed), 'n': len(subset),
      'preferred_logprob_change': float(mon['monitor/preferred_logprob_change']),
      'dispreferred_logprob_change': float(mon['monitor/dispreferred_logprob_change']),
      'share_preferred_fell': float(mon['monitor/share_preferred_fell']),
      'steps': int(result.step), 'dataset_rows': [int(getattr(e, 'index', i)) for i, e in zip(positions, subset)],
  }
  with open(os.path.join(output_dir, RESULT_FILE), 'w') as f:
    json.dump(row, f, indent=1)
  return row


def run(config: Any) -> list[dict[str, Any]]:
  """The Section 5 pipeline for `config.quantiles` (see module docstring); returns the result rows."""

  qc = config.quantiles
  measures = tuple(qc.get('measures') or MEASURES) if qc.measure == 'all' else (check_measure(qc.measure),)
  for m in measures:
    check_measure(m)
  quantiles = tuple(qc.get('quantiles') or QUANTILES) if float(qc.q) < 0 else (float(qc.q),)
  seeds = tuple(qc.seeds) if qc.get('seeds') else (int(config.seed),)
  examples = schema.load_preference_data(config.data.path, split=config.data.get('split', 'train'),
                                         limit=int(config.data.limit) or None)
  rows = sample_rows(len(examples), int(qc.num_rows), int(qc.get('sample_seed', 0)))
  examples = [examples[int(i)] for i in rows]
  window = min(int(qc.window), len(examples))
  single = len(measures) * len(quantiles) * len(seeds) == 1
  results = []
  for seed in seeds:
    seed_config = copy.deepcopy(config)
    with seed_config.unlocked():
      seed_config.seed = int(seed)
    scores = compute_scores(seed_config, examples)  # per seed only when new-token embeddings depend on it
    for (measure, q), positions in plan({m: scores[m] for m in measures}, quantiles, window).items():
      out_dir = config.output_dir if single else os.path.join(config.output_dir, f'{measure}_q{q:g}_seed{seed}')
      results.append(train_subset(config, examples, positions, measure, q, seed, out_dir))
  os.makedirs(config.output_dir, exist_ok=True)
  with open(os.path.join(config.output_dir, RESULTS_FILE), 'w') as f:
    f.writelines(json.dumps({k: v for k, v in r.items() if k != 'dataset_rows'}) + '\n' for r in results)
  for row in aggregate(results):
    print(f'{row["measure"]:34s} q={row["q"]:.2f}  preferred log-prob change {row["mean"]:+.4f} '
          f'[{row["min"]:+.4f}, {row["max"]:+.4f}] over {row["n_seeds"]} seed(s)', flush=True)
  return results
