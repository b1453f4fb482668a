r"""Score preference pairs by CHES and the baseline measures, then optionally filter them.

    python -m displacement_jax.score --config=configs/score_tiny.py
    python -m displacement_jax.score --config=configs/score_tiny.py --config.filter.mode=lowest_fraction \
        --config.filter.fraction=0.05

For every row, with the exact positions and ids of the authors' code (compute_preference_similarity_per_example.py):
  ches, ln_ches              Definitions 2-3: final-norm hidden states (the LM-head input) summed in float32 over
                             the positions that predict a response token, i.e. the last prompt token .. the last
                             response token (the one that predicts EOS); |y| counts the appended EOS.
  minus_normalized_edit_distance
                             -Levenshtein(ids of y+, ids of y-) / max(|y+|, |y-|) on the response token ids
                             WITHOUT the appended EOS.
  last_hidden_inner_product  <h, h'> of the final-norm hidden states at the LAST RESPONSE TOKEN of (x, y+) and of
                             (x, y-), the positions that predict EOS (EOS itself never enters the input there).
A response cut by truncation has no EOS; then its last kept token is used. `measures_include_eos=True`
(`config.measures.include_eos`) gives the EOS-inclusive variants instead (ids with EOS; hidden state at the
EOS position). Also the response / sequence lengths.

Each pair is one shared-prompt packed row [prompt, chosen, rejected] (data/packing.py: the prompt runs once;
`data.shared_prompt_packing=False` runs the two sides separately, same scores). Rows are sorted by length and
scored in length buckets (each batch padded to its own bucket length, not the
global maximum), with one jitted function sharded over the mesh's batch axes ('data', 'fsdp'); each batch is
padded to a fixed multiple of the device count and the padding rows are dropped.

Outputs in `output_dir`: scores.jsonl (one object per row, dataset order, with its `index`), summary.json
(count, mean, std and quantiles of each measure), ln_ches_hist.png, and with `filter.mode != 'none'`:
filtered.jsonl (the selected original rows in the generic preference jsonl schema, dataset order, ready for
`displacement_jax.train`) and filtered_indices.json.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from displacement_jax import ches as ches_lib
from displacement_jax import filtering
from displacement_jax.data import batching
from displacement_jax.data import packing as packing_lib

MEASURES = ('ches', 'ln_ches', 'minus_normalized_edit_distance', 'last_hidden_inner_product')
SCORES_FILE, SUMMARY_FILE, HIST_FILE = 'scores.jsonl', 'summary.json', 'ln_ches_hist.png'
FILTERED_FILE, FILTERED_INDICES_FILE = 'filtered.jsonl', 'filtered_indices.json'
QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
SIDES = ('chosen', 'rejected')
# [B] bool batch keys: drop the appended EOS from the last-hidden measure's positions (see the module docstring).
DROP_EOS = {side: f'{side}_ends_eos_B' for side in SIDES}


# ------------------------------------------------------------------------------------------- bucketing


def bucket_length(length: int, max_length: int, min_bucket: int = 16, step: int = 64) -> int:
  """Smallest bucket that holds `length`, capped at `max_length`.

  Buckets are min_bucket * 2^k up to 2 * step, then multiples of `step`: short rows get tight power-of-two
  buckets, long rows waste at most `step - 1` padding positions (at the price of a few more compilations).
  """
  if length < 1:
    raise ValueError(f'sequence length must be >= 1, got {length}')
  b = min_bucket
  while b < length and b < 2 * step:
    b *= 2
  if b < length:
    b = -(-length // step) * step
  return int(min(b, max(max_length, length)))


def trim_sides(batch: dict[str, np.ndarray], max_length: int, padding_side: str) -> dict[str, np.ndarray]:
  """Cut each side's [B, T] arrays to the bucket of that side's longest row (chosen and rejected differ).

  `collate` pads both sides to one T; the model runs each side separately, so the shorter side need not
  carry the other side's padding.
  """
  out = dict(batch)
  for side in SIDES:
    t = batch[f'{side}_attention_mask_BT'].shape[1]
    longest = int(np.asarray(batch[f'{side}_attention_mask_BT']).sum(axis=1).max())
    keep = min(bucket_length(longest, max_length), t)
    cols = slice(0, keep) if padding_side == 'right' else slice(t - keep, t)
    for key in batch:
      if key.startswith(f'{side}_') and key.endswith('_BT'):
        out[key] = batch[key][:, cols]
  return out


def plan_batches(lengths: Sequence[int], batch_size: int, max_length: int, *, bucketed: bool = True
                 ) -> list[tuple[np.ndarray, int]]:
  """[(row positions, padded length)] covering every row once.

  bucketed: rows sorted by length (stable) and cut into batches of `batch_size`, each padded to the bucket
  of its longest row. Not bucketed: dataset order, every batch padded to `max_length` (the reference path).
  """
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}')
  lengths = np.asarray(lengths, np.int64)
  order = np.argsort(lengths, kind='stable') if bucketed else np.arange(len(lengths))
  plan = []
  for start in range(0, len(order), batch_size):
    rows = order[start:start + batch_size]
    pad_to = bucket_length(int(lengths[rows].max()), max_length) if bucketed else int(max_length)
    plan.append((rows, pad_to))
  return plan


# ------------------------------------------------------------------------------------------------ core


def score_batch(model: Any, params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Per-row [B] float32 CHES, LN-CHES, last-hidden inner product and mask counts of a collated batch
  (two-side, or shared-prompt packed: then `score_packed_batch`)."""
  if packing_lib.is_packed(batch):
    return score_packed_batch(model, params, batch)

  def hidden(side):
    out = model.apply({'params': params}, batch[f'{side}_input_ids_BT'], batch[f'{side}_attention_mask_BT'],
                      return_logits=False, return_hidden=True)
    return out.hidden_BTD

  h_pos_BTD, h_neg_BTD = hidden('chosen'), hidden('rejected')
  comps = ches_lib.ches_components(h_pos_BTD, h_neg_BTD, batch['chosen_loss_mask_BT'],
                                   batch['rejected_loss_mask_BT'])
  lhip_B = ches_lib.last_hidden_inner_product(
      h_pos_BTD, h_neg_BTD, ches_lib.without_last_position(batch['chosen_attention_mask_BT'], batch[DROP_EOS['chosen']]),
      ches_lib.without_last_position(batch['rejected_attention_mask_BT'], batch[DROP_EOS['rejected']]))
  return {'ches': comps['ches'], 'ln_ches': comps['ln_ches'], 'last_hidden_inner_product': lhip_B,
          'chosen_len': comps['chosen_len'], 'rejected_len': comps['rejected_len']}


def score_packed_batch(model: Any, params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """`score_batch` of a shared-prompt packed batch (data/packing.py): one forward per pair, prompt once."""
  from displacement_jax import trainer  # pylint: disable=g-import-not-at-top

  hidden_BTD = trainer.packed_forward_hidden(model, params, batch)
  h_BRD = trainer.response_hidden(hidden_BTD, batch)
  side_BR, branch_BT = batch['response_side_BR'], batch['packed_branch_BT']
  chosen, rejected, prompt = packing_lib.CHOSEN, packing_lib.REJECTED, packing_lib.PROMPT
  comps = ches_lib.ches_components(h_BRD, h_BRD, side_BR == chosen, side_BR == rejected)
  lhip_B = ches_lib.last_hidden_inner_product(
      hidden_BTD, hidden_BTD,
      ches_lib.without_last_position((branch_BT == prompt) | (branch_BT == chosen), batch[DROP_EOS['chosen']]),
      ches_lib.without_last_position((branch_BT == prompt) | (branch_BT == rejected), batch[DROP_EOS['rejected']]))
  return {'ches': comps['ches'], 'ln_ches': comps['ln_ches'], 'last_hidden_inner_product': lhip_B,
          'chosen_len': comps['chosen_len'], 'rejected_len': comps['rejected_len']}


def make_score_fn(model: Any) -> Callable[[Any, dict[str, jax.Array]], dict[str, jax.Array]]:
  """score_fn(params, batch) -> per-row [B] float32 CHES, LN-CHES, last-hidden inner product, mask counts."""
  return functools.partial(score_batch, model)


# The model (a hashable flax module) is a static argument, so repeated scoring calls with the same model reuse
# the compiled executables (one per bucket length) instead of recompiling.
_score_batch_jit = jax.jit(score_batch, static_argnums=0)


def measure_ids(pair: Any, side: str, include_eos: bool = False) -> np.ndarray:
  """The response ids the edit distance compares: without the appended EOS (the authors' ids) unless
  `include_eos`."""
  ids = np.asarray(getattr(pair, f'{side}_ids'))
  return ids[:-1] if not include_eos and batching.ends_with_eos(pair, side) else ids


def tokenize_examples(examples: Sequence[Any], tokenizer: Any, *, max_length: int, format: str,
                      single_token: bool = False, truncation: str = 'truncate_response') -> list[Any]:
  """data.tokenize.TokenizedPair per example (bad rows raise DataError naming file/row/field)."""
  from displacement_jax.data import tokenize  # pylint: disable=g-import-not-at-top

  return [tokenize.tokenize_example(tokenizer, ex, max_length=max_length, format=format, single_token=single_token,
                                    truncation=truncation) for ex in examples]


def score_examples(model: Any, params: Any, config: ml_collections.ConfigDict, tokenizer: Any,
                   examples: Sequence[Any], *, batch_size: int, max_length: int, format: str, mesh: Any = None,
                   bucketed: bool = True, packing: bool | None = None, progress: bool = True,
                   measures_include_eos: bool | None = None) -> list[dict[str, Any]]:
  """Score every example; returns one dict per example, in the order of `examples`.

  Keys: index (the example's dataset index), ches, ln_ches, minus_normalized_edit_distance,
  last_hidden_inner_product, chosen_len / rejected_len (response tokens incl. EOS), chosen_total_len /
  rejected_total_len (prompt + response). `config` supplies data.single_token,
  data.padding_side and (unless given) data.shared_prompt_packing and measures.include_eos.
  With `mesh`, batches are sharded over ('data', 'fsdp') and params by `sharding.param_shardings`.
  """
  if not examples:
    raise ValueError('score_examples: no examples to score')
  data_cfg = config.get('data', ml_collections.ConfigDict())
  single = bool(data_cfg.get('single_token', False))
  pairs = tokenize_examples(examples, tokenizer, max_length=int(max_length), format=format, single_token=single)
  pad_id = tokenizer.pad_token_id if getattr(tokenizer, 'pad_token_id', None) is not None else 0
  results = score_pairs(model, params, pairs, batch_size=batch_size, max_length=max_length, pad_id=pad_id,
                        padding_side=data_cfg.get('padding_side', 'right'), mesh=mesh, bucketed=bucketed,
                        packing=bool(data_cfg.get('shared_prompt_packing', True)) if packing is None else packing,
                        progress=progress, measures_include_eos=(
                            bool(config.get('measures', {}).get('include_eos', False)) if measures_include_eos is None
                            else measures_include_eos))
  for result, example in zip(results, examples):
    result['index'] = int(getattr(example, 'index', result['index']))
  return results


def score_pairs(model: Any, params: Any, pairs: Sequence[Any], *, batch_size: int, max_length: int,
                pad_id: int = 0, padding_side: str = 'right', mesh: Any = None, bucketed: bool = True,
                packing: bool = True, progress: bool = True, measures_include_eos: bool = False
                ) -> list[dict[str, Any]]:
  """Score already tokenized pairs (`data.tokenize.TokenizedPair`); one dict per pair, in input order.

  The work of `score_examples` after tokenization: length buckets, one jitted call per batch, sharded over
  the mesh's batch axes when `mesh` is given. `index` is the pair's own `index`. packing: one shared-prompt
  packed row per pair (data/packing.py; the prompt is run once), else the two sides separately.
  measures_include_eos: the EOS-inclusive edit distance / last-hidden variants (module docstring).
  """
  if not pairs:
    raise ValueError('score_pairs: no pairs to score')
  dp = 1
  if mesh is not None:
    from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
    from displacement_jax import sharding  # pylint: disable=g-import-not-at-top

    dp = int(mesh.shape['data'] * mesh.shape['fsdp'])
    param_sh, batch_sh = sharding.param_shardings(params, mesh), sharding.batch_sharding(mesh)
    params = jax.device_put(params, param_sh)
    jitted = jax.jit(make_score_fn(model), in_shardings=(param_sh, batch_sh), out_shardings=NamedSharding(mesh, P()))
    put = lambda b: {k: jax.device_put(np.asarray(v), batch_sh) for k, v in b.items()}
  else:
    jitted = functools.partial(_score_batch_jit, model)
    put = lambda b: {k: jnp.asarray(v) for k, v in b.items()}
  rows_per_batch = -(-int(batch_size) // dp) * dp  # fixed batch dim: one compile per bucket length

  # Sort and bucket by the row length the model runs: the packed row p + c + r, or the longer side.
  length_of = batching.packed_length if packing else batching.pair_length
  cap = 2 * int(max_length) if packing else int(max_length)
  plan = plan_batches([length_of(p) for p in pairs], rows_per_batch, cap, bucketed=bucketed)
  results: list[dict[str, Any] | None] = [None] * len(pairs)
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

  bar = tqdm(total=len(pairs), desc='score', disable=not progress, dynamic_ncols=True)
  for rows, pad_to in plan:
    padded = np.concatenate([rows, np.full(rows_per_batch - len(rows), rows[-1])])
    batch_pairs = [pairs[i] for i in padded]
    if packing:
      batch = batching.collate(batch_pairs, pad_id=pad_id, padding_side=padding_side)
      size = (lambda n: bucket_length(n, cap)) if bucketed else (lambda n: cap)
      device_batch = {k: v for k, v in packing_lib.pack_batch(batch, pad_id=pad_id, bucket=size).items()
                      if k in packing_lib.PACKED_KEYS}
    else:
      batch = batching.collate(batch_pairs, pad_id=pad_id, padding_side=padding_side, pad_to=pad_to)
      if bucketed:
        batch = trim_sides(batch, int(max_length), padding_side)
      device_batch = {k: v for k, v in batch.items() if k.endswith('_BT')}
    for key in DROP_EOS.values():
      device_batch[key] = batch[key] & (not measures_include_eos)
    out = jax.device_get(jitted(params, put(device_batch)))
    for j, row in enumerate(rows):  # rows past len(rows) are padding and are dropped here
      ids_pos = measure_ids(pairs[row], 'chosen', measures_include_eos)
      ids_neg = measure_ids(pairs[row], 'rejected', measures_include_eos)
      results[row] = {
          'index': int(getattr(pairs[row], 'index', row)),
          'ches': float(out['ches'][j]),
          'ln_ches': float(out['ln_ches'][j]),
          'minus_normalized_edit_distance': float(ches_lib.minus_normalized_edit_distance(ids_pos, ids_neg)),
          'last_hidden_inner_product': float(out['last_hidden_inner_product'][j]),
          'chosen_len': int(out['chosen_len'][j]),
          'rejected_len': int(out['rejected_len'][j]),
          'chosen_total_len': int(np.asarray(batch['chosen_attention_mask_BT'][j]).sum()),
          'rejected_total_len': int(np.asarray(batch['rejected_attention_mask_BT'][j]).sum()),
      }
    bar.update(len(rows))
  bar.close()
  return results  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------- outputs


def summarize(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Count, mean, std, min/max and quantiles of each measure (non-finite values counted, not averaged)."""
  summary: dict[str, Any] = {'num_rows': len(results)}
  for measure in MEASURES + ('chosen_len', 'rejected_len'):
    vals = np.asarray([r[measure] for r in results], np.float64)
    finite = vals[np.isfinite(vals)]
    stats: dict[str, Any] = {'num_nonfinite': int(vals.size - finite.size)}
    if finite.size:
      stats.update(mean=float(finite.mean()), std=float(finite.std()),
                   quantiles={str(q): float(np.quantile(finite, q)) for q in QUANTILES})
    summary[measure] = stats
  return summary


def _json_float(x: float) -> Any:
  return x if math.isfinite(x) else ('nan' if math.isnan(x) else ('inf' if x > 0 else '-inf'))


def write_scores(results: Sequence[dict[str, Any]], path: str) -> None:
  """scores.jsonl: one JSON object per row (non-finite floats as "nan"/"inf" strings)."""
  with open(path, 'w') as f:
    for r in results:
      f.write(json.dumps({k: _json_float(v) if isinstance(v, float) else v for k, v in r.items()}) + '\n')


def plot_histogram(values: np.ndarray, path: str, *, title: str = 'LN-CHES') -> None:
  """Histogram PNG of one measure (matplotlib Agg)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  values = np.asarray(values, np.float64)
  values = values[np.isfinite(values)]
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.hist(values, bins=min(50, max(5, values.size // 4)), color='tab:blue', alpha=0.8)
  ax.set_xlabel(title)
  ax.set_ylabel('pairs')
  ax.set_title(f'{title} over {values.size} pairs (higher = more displacement)')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def example_to_json(example: Any) -> dict[str, Any]:
  """A PreferenceExample as a row of the generic preference jsonl schema (prompt/chosen/rejected)."""
  row = {'prompt': example.prompt, 'chosen': example.chosen, 'rejected': example.rejected}
  meta = dict(getattr(example, 'meta', None) or {})
  meta.setdefault('source_index', int(example.index))
  if getattr(example, 'source', None):
    meta.setdefault('source', example.source)
  row['meta'] = meta
  return row


def select_rows(results: Sequence[dict[str, Any]], filter_cfg: ml_collections.ConfigDict) -> np.ndarray:
  """Positions (into `results`) picked by filter.mode on filter.measure, ascending by score."""
  measure = filter_cfg.get('measure', 'ln_ches')
  if measure not in MEASURES:
    raise ValueError(f'config.filter.measure must be one of {MEASURES}, got {measure!r}')
  scores = np.asarray([r[measure] for r in results], np.float64)
  k, fraction, q = filter_cfg.get('k'), filter_cfg.get('fraction'), filter_cfg.get('q')
  return filtering.select(scores, filter_cfg.get('mode', 'none'), k=int(k) if k else None,
                          fraction=float(fraction) if fraction else None, q=None if q is None else float(q),
                          window=int(filter_cfg.get('window', 512)))


def write_filtered(examples: Sequence[Any], results: Sequence[dict[str, Any]], selected: np.ndarray,
                   filter_cfg: ml_collections.ConfigDict, output_dir: str) -> dict[str, Any]:
  """filtered.jsonl (selected rows, dataset order) + filtered_indices.json; returns the indices record."""
  keep = np.sort(np.asarray(selected, np.int64))
  with open(os.path.join(output_dir, FILTERED_FILE), 'w') as f:
    for pos in keep:
      f.write(json.dumps(example_to_json(examples[pos])) + '\n')
  measure = filter_cfg.get('measure', 'ln_ches')
  record = {
      'mode': filter_cfg.mode, 'measure': measure,
      'k': filter_cfg.get('k'), 'fraction': filter_cfg.get('fraction'), 'q': filter_cfg.get('q'),
      'window': filter_cfg.get('window'), 'num_rows': len(results), 'num_selected': int(keep.size),
      'indices': [int(results[p]['index']) for p in keep],                 # dataset indices, dataset order
      'indices_by_score': [int(results[p]['index']) for p in selected],    # ascending by the measure
      'scores_by_score': [_json_float(float(results[p][measure])) for p in selected],
  }
  with open(os.path.join(output_dir, FILTERED_INDICES_FILE), 'w') as f:
    json.dump(record, f, indent=1)
  return record


# ---------------------------------------------------------------------------------------------------- run


def load_examples(config: ml_collections.ConfigDict) -> list[Any]:
  """Rows of config.data.path (data.schema, data.split); data.limit > 0 keeps a seeded random subset
  (data.seed) in dataset order, as the paper's 5000 random UltraFeedback rows."""
  from displacement_jax.data import schema  # pylint: disable=g-import-not-at-top

  dc = config.data
  limit = int(dc.get('limit', 0) or 0)
  return list(schema.load_preference_data(dc.path, split=dc.get('split') or None, schema=dc.get('schema', 'auto'),
                                          limit=limit or None, seed=int(dc.get('seed', 0))))


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Load model + data, score every row, write the outputs; returns {'results', 'summary', 'filter'}."""
  from displacement_jax import sharding  # pylint: disable=g-import-not-at-top
  from displacement_jax import train as train_lib  # pylint: disable=g-import-not-at-top

  if not config.get('output_dir'):
    raise ValueError('config.output_dir must be set')
  if not config.data.get('path'):
    raise ValueError('config.data.path must name a preference jsonl file or dataset id')
  filter_cfg = config.get('filter', ml_collections.ConfigDict({'mode': 'none'}))
  if filter_cfg.get('mode', 'none') not in filtering.MODES:
    raise ValueError(f'config.filter.mode must be one of {filtering.MODES}, got {filter_cfg.get("mode")!r}')
  sharding.initialize_distributed_if_needed()
  mesh = sharding.make_mesh(data=int(config.mesh.data), fsdp=int(config.mesh.fsdp), tensor=int(config.mesh.tensor))
  examples = load_examples(config)  # bad rows fail here, before the model is built
  loaded = train_lib.load_model(config, mesh)
  results = score_examples(loaded.model, loaded.params, config, loaded.tokenizer, examples,
                           batch_size=int(config.batch_size), max_length=int(config.data.max_length),
                           format=config.data.format, mesh=mesh, progress=bool(config.get('progress', True)))
  summary = summarize(results)
  summary.update(data_path=config.data.path, model=config.model.get('path') or config.model.get('tiny'),
                 format=config.data.format, max_length=int(config.data.max_length), devices=int(mesh.size))
  selected = select_rows(results, filter_cfg) if filter_cfg.get('mode', 'none') != 'none' else None
  record = None
  if jax.process_index() == 0:  # every host holds all results; one writes them
    os.makedirs(config.output_dir, exist_ok=True)
    write_scores(results, os.path.join(config.output_dir, SCORES_FILE))
    with open(os.path.join(config.output_dir, SUMMARY_FILE), 'w') as f:
      json.dump(summary, f, indent=1)
    plot_histogram(np.asarray([r['ln_ches'] for r in results]), os.path.join(config.output_dir, HIST_FILE))
    if selected is not None:
      record = write_filtered(examples, results, selected, filter_cfg, config.output_dir)
  ln = summary['ln_ches']
  if jax.process_index() != 0:
    return {'results': results, 'summary': summary, 'filter': None}
  print(f'scored {len(results)} pairs from {config.data.path} -> {config.output_dir}/{SCORES_FILE}; '
        f'LN-CHES mean {ln.get("mean", float("nan")):.4g} median '
        f'{ln.get("quantiles", {}).get("0.5", float("nan")):.4g}', flush=True)
  if record is not None:
    print(f'filter {record["mode"]} on {record["measure"]}: kept {record["num_selected"]} of {len(results)} rows -> '
          f'{config.output_dir}/{FILTERED_FILE}', flush=True)
  return {'results': results, 'summary': summary, 'filter': record}


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry; returns 0, 1 (bad input: one-line message on stderr) or 2 (bad flags)."""
  from displacement_jax import cli  # pylint: disable=g-import-not-at-top

  flag_values, status = cli.parse_config_flags(argv, 'score')
  if flag_values is None:
    return status
  try:
    run(flag_values.config)
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
