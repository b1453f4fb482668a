r"""Preference training CLI: `python -m displacement_jax.train --config=configs/<name>.py[:arg]`.

Any config field can be overridden (`--config.optim.lr=1e-7`); `--resume` continues from the latest
checkpoint in `output_dir`. A config with `pipeline='<name>'` is handed to that registered pipeline
(e.g. 'demo' -> displacement_jax.demo.run(config)). The library entry is `run(config, *, resume=False)`.

One run: load model + tokenizer -> load, tokenize and check the data (truncations counted and reported)
-> reference log-probs with the initial params (cached on disk) -> jitted, mesh-sharded train steps
(gradient accumulation inside the step) with metrics.jsonl / TensorBoard / tqdm, the displacement monitor
every `eval.every` steps and orbax checkpoints every `checkpoint.every` steps -> optional HF export.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math
import os
import shutil
import sys
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from displacement_jax import checkpoint as checkpoint_lib
from displacement_jax import metrics as metrics_lib
from displacement_jax import monitor as monitor_lib
from displacement_jax import optim as optim_lib
from displacement_jax import reference as reference_lib
from displacement_jax import trainer
from displacement_jax.models import packaged

# Registered pipelines: `config.pipeline` -> module with `run(config)`. A dotted module path also works.
PIPELINES = {
    'demo': 'displacement_jax.demo',
    'persona': 'displacement_jax.experiments.persona',
    'quantiles': 'displacement_jax.experiments.quantiles',
    'ches_quantiles': 'displacement_jax.experiments.quantiles',
    'sorry_bench': 'displacement_jax.experiments.sorry_bench',
}

OBJECTIVES = ('dpo', 'ipo', 'cross_entropy', 'slic', 'dpop', 'gpo')
STEP_KEYS = ('loss', 'preferred_change', 'dispreferred_change', 'chosen_logps', 'rejected_logps',
             'reward_accuracy', 'share_preferred_fell', 'grad_norm')


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN/inf; a checkpoint of the last state was written before raising."""


@dataclasses.dataclass
class RunResult:
  """What `run` returns: final params (host numpy), per-step metric rows and run facts."""
  params: Any
  step: int
  output_dir: str
  metrics: list[dict[str, Any]]
  monitor: dict[str, Any]
  reference_from_cache: bool
  truncation: dict[str, Any]
  stopped_early: bool = False
  hf_dir: str | None = None

  @property
  def losses(self) -> list[float]:
    return [row['loss'] for row in self.metrics if 'loss' in row]


def _log(msg: str) -> None:
  """Print a line on process 0 (above any tqdm bar) and log it."""
  logging.info(msg)
  if jax.process_index() == 0:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

    tqdm.write(msg, file=sys.stdout)


# ----------------------------------------------------------------------------------------------- config


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raise ValueError naming the field for inconsistent training configs."""
  if bool(config.model.get('path')) == bool(config.model.get('tiny')):
    raise ValueError('exactly one of config.model.path and config.model.tiny must be set, got '
                     f'path={config.model.get("path")!r} tiny={config.model.get("tiny")!r}')
  if not config.data.get('path'):
    raise ValueError('config.data.path must name a preference jsonl file or dataset id')
  if config.loss.objective not in OBJECTIVES:
    raise ValueError(f'config.loss.objective must be one of {OBJECTIVES}, got {config.loss.objective!r}')
  if config.batch_size < 1:
    raise ValueError(f'config.batch_size must be >= 1, got {config.batch_size}')
  accum = int(config.optim.grad_accum)
  if accum < 1 or config.batch_size % accum:
    raise ValueError(f'config.batch_size={config.batch_size} must be a positive multiple of '
                     f'config.optim.grad_accum={accum}')
  if config.num_steps <= 0 and config.num_epochs <= 0:
    raise ValueError('set config.num_steps > 0 or config.num_epochs > 0')
  if not config.get('output_dir'):
    raise ValueError('config.output_dir must be set')


def resolve_pipeline(name: str) -> Callable[[ml_collections.ConfigDict], Any]:
  """The `run(config)` function of a registered pipeline (or of a dotted module path)."""
  module_name = PIPELINES.get(name, name if '.' in name else None)
  if module_name is None:
    raise ValueError(f'config.pipeline={name!r} is not a registered pipeline; known: {sorted(PIPELINES)} '
                     'or a dotted module path with run(config)')
  module = importlib.import_module(module_name)
  if not hasattr(module, 'run'):
    raise ValueError(f'pipeline module {module_name} has no run(config) function')
  return module.run


# ------------------------------------------------------------------------------------------ model + data


@dataclasses.dataclass
class Loaded:
  """A model ready to train: flax module, initial params, ModelConfig, tokenizer and its identity."""
  model: Any
  params: Any
  model_config: Any
  tokenizer: Any
  identity: dict[str, Any]


def load_model(config: ml_collections.ConfigDict, mesh: Any = None) -> Loaded:
  """Tiny random model (`model.tiny`) or HF checkpoint (`model.path`), tokenizer, special tokens."""
  from displacement_jax import models  # pylint: disable=g-import-not-at-top

  def tok_lib():
    from displacement_jax.models import tokenizer  # pylint: disable=g-import-not-at-top
    return tokenizer

  mc = config.model
  dtype, param_dtype, remat = mc.dtype, mc.get('param_dtype') or mc.dtype, bool(mc.get('remat', False))
  if mc.get('tiny'):
    from displacement_jax.testing import tiny  # pylint: disable=g-import-not-at-top

    tokenizer = tok_lib().load_tokenizer(mc.tokenizer) if mc.get('tokenizer') else tiny.build_tiny_tokenizer()
    hf_config = tiny.tiny_hf_config(mc.tiny, **({'vocab_size': int(mc.tiny_vocab_size)}
                                                 if mc.get('tiny_vocab_size') else {}))
    model_config = models.ModelConfig.from_hf(hf_config, dtype=dtype, param_dtype=param_dtype, remat=remat)
    model = models.Transformer(model_config)
    ids = jnp.zeros((1, 4), jnp.int32)
    params = jax.jit(lambda k: model.init(k, ids, jnp.ones((1, 4), bool))['params'])(
        jax.random.key(int(mc.seed)))
    identity = {'tiny': mc.tiny, 'hf_config': hf_config, 'seed': int(mc.seed)}
  else:
    model, params, model_config = models.load(mc.path, dtype=dtype, param_dtype=param_dtype, mesh=mesh, remat=remat,
                                              progress=bool(config.get('progress', True)))
    tokenizer = tok_lib().load_tokenizer(mc.get('tokenizer') or mc.path)
    identity = {'path': os.path.abspath(mc.path) if os.path.exists(mc.path) else mc.path}
    if packaged.is_gguf(mc.path):  # a packaged name: the file it resolves to and its size identify the weights
      file = packaged.resolve_gguf(mc.path)
      identity.update(file=os.path.abspath(file), file_size=os.path.getsize(file))
  identity.update(dtype=dtype, param_dtype=param_dtype, tokenizer=mc.get('tokenizer') or '',
                  tokenizer_vocab=len(tokenizer))
  if config.data.get('add_special_tokens'):
    tokenizer, params, model_config = tok_lib().add_special_tokens_and_resize(
        tokenizer, params, model_config, seed=int(config.seed))
    model = models.Transformer(model_config)
    identity['special_tokens_seed'] = int(config.seed)
  from displacement_jax.data import tokenize as tokenize_lib  # pylint: disable=g-import-not-at-top

  tokenize_lib.check_vocab(tokenizer, model_config.vocab_size,
                           source=f'tokenizer/model vocabulary mismatch (model {mc.get("path") or mc.get("tiny")!r}, '
                                  f'tokenizer {mc.get("tokenizer") or "of the model"!r})')
  return Loaded(model, params, model_config, tokenizer, identity)


@dataclasses.dataclass
class Dataset:
  """Tokenized preference pairs, the truncation report, the pad id and row index -> position in `pairs`."""
  pairs: list[Any]
  truncation: dict[str, Any]
  pad_id: int
  position_of: dict[int, int]


def load_data(config: ml_collections.ConfigDict, tokenizer: Any, vocab_size: int) -> Dataset:
  """Load, validate and tokenize the preference data (bad rows raise DataError naming file/row/field).

  Pairs longer than `data.max_length` follow `data.truncation` ('truncate_response': the response is cut
  and the pair counted in the report, `data/truncated_pairs` in metrics.jsonl; 'error': DataError). A prompt
  that leaves no room for a response always raises DataError.
  """
  from displacement_jax.data import schema, tokenize  # pylint: disable=g-import-not-at-top

  dc = config.data
  examples = schema.load_preference_data(dc.path, split=dc.get('split') or None, schema=dc.get('schema', 'auto'),
                                         limit=int(dc.limit) or None, seed=int(config.seed))
  if not examples:
    raise ValueError(f'config.data.path={dc.path!r} holds no preference rows')
  pairs, report = tokenize.tokenize_dataset(examples, tokenizer, max_length=int(dc.max_length), format=dc.format,
                                            truncation=dc.get('truncation', 'truncate_response'),
                                            single_token=bool(dc.single_token))
  tokenize.check_pair_ids(pairs, vocab_size, source=str(dc.path))
  position_of = {int(p.index): i for i, p in enumerate(pairs)}
  if len(position_of) != len(pairs):
    raise ValueError(f'config.data.path={dc.path!r}: row indices of the tokenized pairs are not unique')
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  return Dataset(list(pairs), dataclasses.asdict(report), int(pad_id), position_of)


def collate(pairs: Sequence[Any], pad_id: int, config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """Collate tokenized pairs into the batch contract, padded to max_length (one compiled shape)."""
  from displacement_jax.data import batching  # pylint: disable=g-import-not-at-top

  return batching.collate(list(pairs), pad_id=pad_id, padding_side=config.data.get('padding_side', 'right'),
                          pad_to=int(config.data.max_length))


def packing_enabled(config: ml_collections.ConfigDict) -> bool:
  """config.data.shared_prompt_packing: train and compute reference log-probs on packed rows (data/packing.py)."""
  return bool(config.data.get('shared_prompt_packing', True))


def pack_for_logps(batch: dict[str, np.ndarray], pad_id: int, config: ml_collections.ConfigDict
                   ) -> dict[str, np.ndarray]:
  """The packed layout of a collated batch when packing is on (T and R rounded up to 64: few compiles)."""
  if not packing_enabled(config):
    return batch
  from displacement_jax.data import packing  # pylint: disable=g-import-not-at-top

  return packing.pack_batch(batch, pad_id=pad_id, multiple=64)


def make_iterator(dataset: Dataset, config: ml_collections.ConfigDict) -> Any:
  """The seeded, resumable batch iterator (data.batching.BatchIterator) giving this host its rows.

  Full global batches only (drop_last): every step averages over exactly `batch_size` real pairs.
  """
  from displacement_jax.data import batching  # pylint: disable=g-import-not-at-top

  if len(dataset.pairs) < int(config.batch_size):
    raise ValueError(f'the data ({config.data.path}) has {len(dataset.pairs)} pairs, fewer than '
                     f'config.batch_size={config.batch_size}')
  return batching.BatchIterator(dataset.pairs, int(config.batch_size), seed=int(config.seed),
                                shuffle=bool(config.data.get('shuffle', True)), drop_last=True,
                                pad_id=dataset.pad_id, padding_side=config.data.get('padding_side', 'right'),
                                process_index=jax.process_index(), process_count=jax.process_count(),
                                shared_prompt_packing=packing_enabled(config))


# ------------------------------------------------------------------------------------- sharded helpers


def host_local_rows(global_batch: int) -> slice:
  """This host's contiguous share of a global batch (per-host data shards)."""
  n = jax.process_count()
  if global_batch % n:
    raise ValueError(f'global batch {global_batch} does not split over {n} hosts')
  per = global_batch // n
  return slice(jax.process_index() * per, (jax.process_index() + 1) * per)


def put_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Global jax arrays from this host's rows of a global numpy batch."""
  local = host_local_rows(next(iter(batch.values())).shape[0])
  return put_local_batch({k: np.asarray(v)[local] for k, v in batch.items()}, sharding)


def put_local_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Global jax arrays from the rows this host holds (per-host data shards)."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def data_parallel_size(mesh: Any) -> int:
  return int(mesh.shape['data'] * mesh.shape['fsdp'])


def pad_rows(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


# ---------------------------------------------------------------------------------------------- reference


def reference_arrays(loaded: Loaded, dataset: Dataset, monitor_rows: np.ndarray, config: ml_collections.ConfigDict,
                     logps_fn: Callable, next_token_fn: Callable | None, batch_sharding: NamedSharding,
                     dp: int) -> tuple[dict[str, np.ndarray], bool]:
  """Reference log-probs of every pair (and single-token monitor probabilities), cached on disk."""
  key = reference_lib.cache_key(
      model=loaded.identity, data=reference_lib.hash_pairs(dataset.pairs), data_path=config.data.path,
      n=len(dataset.pairs), max_length=int(config.data.max_length), format=config.data.format,
      single_token=bool(config.data.single_token), monitor_rows=reference_lib.hash_arrays([monitor_rows]),
      chunk=int(config.logprob_chunk_size), monitor_baseline=1)
  cache_dir = None
  if config.reference.get('cache', True):
    cache_dir = config.reference.get('cache_dir') or os.path.join(config.output_dir, 'reference_cache')

  def compute() -> dict[str, np.ndarray]:
    bs = int(config.reference.get('batch_size') or max(config.batch_size // config.optim.grad_accum, 1))
    bs = pad_rows(bs, dp)
    n = len(dataset.pairs)
    chosen, rejected = np.zeros(n, np.float32), np.zeros(n, np.float32)
    bar = metrics_lib.progress_bar(n, enabled=bool(config.get('progress', True)), desc='reference')
    for start in range(0, n, bs):
      rows = np.arange(start, min(start + bs, n))
      padded = np.concatenate([rows, np.full(bs - len(rows), rows[-1])])
      batch = put_batch(pack_for_logps(collate([dataset.pairs[i] for i in padded], dataset.pad_id, config),
                                       dataset.pad_id, config), batch_sharding)
      out = jax.device_get(logps_fn(loaded.params, batch))
      chosen[rows] = out['chosen_logps_B'][:len(rows)]
      rejected[rows] = out['rejected_logps_B'][:len(rows)]
      bar.update(len(rows))
    bar.close()
    arrays = {'chosen_ref_logps': chosen, 'rejected_ref_logps': rejected}
    # The monitor's own baseline: the monitor batch through the very function (and pytree, zeros standing in for
    # the reference values) the monitor evaluates later, so its step-0 change is exactly 0, not float noise of
    # a differently shaped (packed) pass.
    placeholder = {'chosen_ref_logps': np.zeros(n, np.float32), 'rejected_ref_logps': np.zeros(n, np.float32)}
    batch = put_batch(monitor_batch(dataset, monitor_rows, config, dp, placeholder), batch_sharding)
    base = jax.device_get(logps_fn(loaded.params, batch))
    arrays['monitor_chosen_ref_logps'] = np.asarray(base['chosen_logps_B'][:len(monitor_rows)], np.float32)
    arrays['monitor_rejected_ref_logps'] = np.asarray(base['rejected_logps_B'][:len(monitor_rows)], np.float32)
    if next_token_fn is not None:
      probs = np.asarray(jax.device_get(next_token_fn(loaded.params, batch))['prob_BV'])[:len(monitor_rows)]
      arrays['monitor_ref_prob_V'] = probs.mean(0)
    return arrays

  return reference_lib.cached_reference(cache_dir, key, compute, log=_log)


def monitor_batch(dataset: Dataset, rows: np.ndarray, config: ml_collections.ConfigDict, dp: int,
                  ref: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The fixed monitor subset with its reference log-probs, padded (by repeating its last row) to a multiple
  of the data-parallel size."""
  padded = np.concatenate([rows, np.full(pad_rows(len(rows), dp) - len(rows), rows[-1])])
  return add_reference(collate([dataset.pairs[i] for i in padded], dataset.pad_id, config), padded, ref)


def add_reference(batch: dict[str, np.ndarray], rows: np.ndarray, ref: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Attach reference log-probs of `rows` (positions in dataset.pairs) to a collated batch."""
  return dict(batch, chosen_ref_logps_B=ref['chosen_ref_logps'][rows],
              rejected_ref_logps_B=ref['rejected_ref_logps'][rows])


def positions(batch: dict[str, np.ndarray], dataset: Dataset) -> np.ndarray:
  """Positions in dataset.pairs of the rows of a collated batch (from its index_B)."""
  return np.asarray([dataset.position_of[int(i)] for i in batch['index_B']], np.int64)


# ------------------------------------------------------------------------------------------------- run


def num_train_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """config.num_steps when > 0, else num_epochs full passes."""
  if config.num_steps > 0:
    return int(config.num_steps)
  return int(config.num_epochs) * int(steps_per_epoch)


def run(config: ml_collections.ConfigDict, *, resume: bool = False) -> RunResult:
  """Train with `config` (see configs/base.py); `resume=True` continues from the latest checkpoint."""
  if config.get('pipeline'):
    return resolve_pipeline(config.pipeline)(config)
  validate_config(config)
  from displacement_jax import sharding  # pylint: disable=g-import-not-at-top

  if hasattr(sharding, 'initialize_distributed_if_needed'):
    sharding.initialize_distributed_if_needed()
  mesh = sharding.make_mesh(data=int(config.mesh.data), fsdp=int(config.mesh.fsdp), tensor=int(config.mesh.tensor))
  dp = data_parallel_size(mesh)
  if config.batch_size % (dp * int(config.optim.grad_accum)):
    raise ValueError(f'config.batch_size={config.batch_size} must be a multiple of optim.grad_accum='
                     f'{config.optim.grad_accum} x the data-parallel mesh size {dp} (mesh.data x mesh.fsdp, all '
                     'hosts), so every micro-batch splits evenly over the devices')
  os.makedirs(config.output_dir, exist_ok=True)

  loaded = load_model(config, mesh)
  dataset = load_data(config, loaded.tokenizer, loaded.model_config.vocab_size)
  _log(f'data: {len(dataset.pairs)} pairs from {config.data.path}; truncation: {dataset.truncation}')
  chunk = int(config.logprob_chunk_size)
  model = loaded.model

  param_sh = sharding.param_shardings(loaded.params, mesh)
  replicated = NamedSharding(mesh, P())
  batch_sh = sharding.batch_sharding(mesh)
  loaded.params = jax.device_put(loaded.params, param_sh)

  logps_fn = jax.jit(lambda p, b: trainer.pair_logps(model, p, b, chunk),
                     in_shardings=(param_sh, batch_sh), out_shardings=replicated)
  single = bool(config.data.single_token)
  next_token_fn = (jax.jit(lambda p, b: trainer.next_token_outputs(model, p, b),
                           in_shardings=(param_sh, batch_sh), out_shardings=replicated) if single else None)
  unembed_fn = jax.jit(lambda p: trainer.unembed(model, p), in_shardings=(param_sh,), out_shardings=replicated)
  n_monitor = min(len(dataset.pairs), int(config.eval.get('max_samples', 256)))
  monitor_rows = np.arange(n_monitor)
  ref, from_cache = reference_arrays(loaded, dataset, monitor_rows, config, logps_fn, next_token_fn, batch_sh, dp)

  iterator = make_iterator(dataset, config)
  total_steps = num_train_steps(config, iterator.steps_per_epoch)
  optimizer = optim_lib.make_optimizer(config.optim, total_steps)
  loss_fn = trainer.make_loss_fn(model, config.loss, chunk)
  opt_sh = optax_state_shardings(optimizer, loaded.params, param_sh, replicated)
  state_sh = trainer.TrainState(params=param_sh, opt_state=opt_sh, step=replicated, rng=replicated)
  init_state = jax.jit(
      lambda p: trainer.TrainState(params=p, opt_state=optimizer.init(p), step=jnp.zeros((), jnp.int32),
                                   rng=jax.random.key_data(jax.random.key(int(config.seed)))),
      in_shardings=(param_sh,), out_shardings=state_sh, donate_argnums=0)
  state = init_state(loaded.params)
  del loaded.params  # no reference params stay on device: the state holds the (only) copy
  train_step = jax.jit(trainer.make_train_step(loss_fn, optimizer, int(config.optim.grad_accum)),
                       in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated), donate_argnums=0)
  eval_loss_fn = jax.jit(loss_fn, in_shardings=(param_sh, batch_sh), out_shardings=replicated)

  ckpt_dir = os.path.join(config.output_dir, checkpoint_lib.CHECKPOINT_DIR)
  if not resume and os.path.isdir(ckpt_dir):  # a fresh run replaces an old run's checkpoints (like metrics.jsonl)
    if jax.process_index() == 0:
      _log(f'fresh run (no --resume): removing the old checkpoints in {ckpt_dir}')
      shutil.rmtree(ckpt_dir)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

      multihost_utils.sync_global_devices('train: old checkpoints removed')
  ckpt = checkpoint_lib.Checkpointer(ckpt_dir,
                                     keep=int(config.checkpoint.keep),
                                     async_save=bool(config.checkpoint.get('async_save', True)))
  start_step, prev_eval = 0, {}
  if resume:
    if ckpt.latest_step() is None:
      raise FileNotFoundError(f'--resume: no checkpoint in {ckpt.directory}')
    state, meta, start_step = ckpt.restore(state)
    iterator.restore(meta['data'])
    prev_eval = meta.get('monitor_prev', {})
    _log(f'resumed from step {start_step} ({ckpt.directory})')

  is_main = jax.process_index() == 0
  writer = metrics_lib.MetricsWriter(config.output_dir, enabled=is_main,
                                     truncate_after_step=start_step if resume else None)
  writer.write(start_step, {'event': 'resume' if resume else 'start', 'total_steps': total_steps,
                            'reference_from_cache': from_cache,
                            **{f'data/{k}': v for k, v in dataset.truncation.items()}})
  mon_batch_np = monitor_batch(dataset, monitor_rows, config, dp, ref)
  mon_batch = put_batch(mon_batch_np, batch_sh)
  token_names = None
  if single:
    token_names = loaded.tokenizer.convert_ids_to_tokens(list(range(loaded.model_config.vocab_size))
                                                         [:len(loaded.tokenizer)])
    token_names += [f'<unused_{i}>' for i in range(len(token_names), loaded.model_config.vocab_size)]

  def evaluate(step: int) -> dict[str, Any]:
    return run_monitor(state.params, step, unembed_fn, mon_batch, mon_batch_np, n_monitor, ref, logps_fn,
                       eval_loss_fn, next_token_fn, int(config.eval.top_k), token_names)

  rows: list[dict[str, Any]] = []
  last_monitor: dict[str, Any] = {}
  eval_every = int(config.eval.every)
  if not resume:
    last_monitor = evaluate(0)
    _log(monitor_lib.format_line(0, last_monitor))
    prev_eval = {'loss': last_monitor['monitor/loss'], 'preferred': None}
    rows.append(writer.write(0, last_monitor))
  stop_after = int(config.debug.get('stop_after_steps', 0))
  ckpt_every = int(config.checkpoint.every)
  bar = metrics_lib.progress_bar(total_steps, start_step, enabled=bool(config.get('progress', True)) and is_main)
  stopped_early, step = False, start_step

  def save(step: int, st: trainer.TrainState, data_state: dict[str, int] | None = None) -> None:
    ckpt.save(step, st, {'step': step, 'data': data_state or iterator.state(), 'monitor_prev': prev_eval})

  try:
    for step in range(start_step + 1, total_steps + 1):
      data_before = iterator.state()
      local = next(iterator)
      batch = add_reference(local, positions(local, dataset), ref)
      state, step_metrics = train_step(state, put_local_batch(batch, batch_sh))
      step_metrics = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
      if not math.isfinite(step_metrics['loss']):  # the step skipped its update: `state` is the last good one
        if ckpt.latest_step() != step - 1:
          save(step - 1, state, data_before)
        ckpt.wait()
        writer.write(step, step_metrics)
        raise NonFiniteLossError(
            f'non-finite loss {step_metrics["loss"]} at step {step} (lr={config.optim.lr}, objective='
            f'{config.loss.objective}); stopped, the state before this step is checkpointed at step {step - 1} '
            f'in {ckpt.directory}')
      row = dict(step_metrics, epoch=iterator.epoch)
      if eval_every > 0 and step % eval_every == 0 or step == total_steps:
        last_monitor = evaluate(step)
        _log(monitor_lib.format_line(step, last_monitor))
        warning = monitor_lib.displacement_warning(step, last_monitor['monitor/loss'],
                                                   last_monitor['monitor/preferred_logprob_change'],
                                                   prev_eval.get('loss'), prev_eval.get('preferred'),
                                                   nats=float(config.eval.get('warning_nats', monitor_lib.WARNING_NATS)))
        if warning:
          _log(warning)
          last_monitor['monitor/warning'] = warning
        prev_eval = {'loss': last_monitor['monitor/loss'],
                     'preferred': last_monitor['monitor/preferred_logprob_change']}
        row.update(last_monitor)
      if step % int(config.get('log_every', 1) or 1) == 0 or step == total_steps or 'monitor/loss' in row:
        rows.append(writer.write(step, row))
      bar.set_postfix(metrics_lib.postfix(step_metrics, ('loss', 'preferred_change')))
      bar.update(1)
      if ckpt_every > 0 and step % ckpt_every == 0 or step == total_steps or step == stop_after:
        save(step, state)
      if stop_after and step >= stop_after and step < total_steps:
        stopped_early = True
        _log(f'debug.stop_after_steps={stop_after}: stopping at step {step}')
        break
  finally:
    bar.close()
    ckpt.close()
    writer.close()

  params = host_params(state.params)
  hf_dir = None
  if config.get('export_hf') and not stopped_early:  # every process takes part (gathers); process 0 writes
    hf_dir = export_hf(params, loaded, os.path.join(config.output_dir, 'hf'), progress=bool(config.progress))
  return RunResult(params=params, step=step, output_dir=config.output_dir, metrics=rows, monitor=last_monitor,
                   reference_from_cache=from_cache, truncation=dataset.truncation, stopped_early=stopped_early,
                   hf_dir=hf_dir)


def host_params(params: Any) -> Any:
  """Numpy copy of (possibly sharded, multi-host) params on every host."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    return multihost_utils.process_allgather(params, tiled=True)
  return jax.device_get(params)


def optax_state_shardings(optimizer: Any, params: Any, param_sh: Any, replicated: NamedSharding) -> Any:
  """Shardings of the optimizer state: param-shaped leaves follow their param, the rest is replicated."""
  import optax  # pylint: disable=g-import-not-at-top

  abstract = jax.eval_shape(optimizer.init, params)
  return optax.tree_map_params(optimizer, lambda _, sh: sh, abstract, param_sh,
                               transform_non_params=lambda _: replicated)


def run_monitor(params: Any, step: int, unembed_fn: Callable, batch: dict[str, jax.Array], batch_np: dict[str, np.ndarray],
                n: int, ref: dict[str, np.ndarray], logps_fn: Callable, loss_fn: Callable,
                next_token_fn: Callable | None, top_k: int, token_names: list[str] | None) -> dict[str, Any]:
  """Displacement monitor on the fixed subset: log-prob changes, Definition-1 share, single-token gainers."""
  logps = jax.device_get(logps_fn(params, batch))
  loss, _ = jax.device_get(loss_fn(params, batch))
  out: dict[str, Any] = {'monitor/loss': float(loss)}
  out.update(monitor_lib.logprob_change_stats(logps['chosen_logps_B'][:n], logps['rejected_logps_B'][:n],
                                              ref['monitor_chosen_ref_logps'], ref['monitor_rejected_ref_logps']))
  if next_token_fn is not None:
    nt = jax.device_get(next_token_fn(params, batch))
    pos = np.argmax(batch_np['chosen_loss_mask_BT'][:n], axis=-1)
    y_pos = batch_np['chosen_labels_BT'][np.arange(n), pos]
    y_neg = batch_np['rejected_labels_BT'][np.arange(n), pos]
    W_VD = np.asarray(jax.device_get(unembed_fn(params)), np.float32).T
    k = min(top_k, W_VD.shape[0] - 2)
    predicted = monitor_lib.predicted_gainers(W_VD, nt['h_BD'][:n], y_pos, y_neg, nt['prob_BV'][:n], k)
    report = monitor_lib.single_token_report(nt['prob_BV'][:n], ref['monitor_ref_prob_V'], predicted, y_pos,
                                             y_neg, k, token_names)
    if step == 0:  # nothing trained yet: measured gains are rounding noise; keep only the theory's prediction
      report = {key: v for key, v in report.items() if 'predicted' in key}
    out.update(report)
    out.update(monitor_lib.unembedding_metrics(W_VD, int(y_pos[0]), int(y_neg[0])))
    out['monitor/preferred_prob'] = float(np.mean(nt['prob_BV'][np.arange(n), y_pos]))
  return out


def export_hf(params: Any, loaded: Loaded, out_dir: str, *, progress: bool = True) -> str:
  """Save the trained params (and the tokenizer) in HF format (models.io.save_pretrained)."""
  from displacement_jax.models import io as io_lib  # pylint: disable=g-import-not-at-top

  io_lib.save_pretrained(params, loaded.model_config, out_dir, progress=progress)
  if jax.process_index() == 0 and hasattr(loaded.tokenizer, 'save_pretrained'):
    loaded.tokenizer.save_pretrained(out_dir)
  _log(f'exported HF model to {out_dir}')
  return out_dir


# --------------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry: `main(['prog', '--config=configs/dpo_tiny.py', '--config.optim.lr=1e-3', '--resume'])`.

  Returns the exit status (0 ok, 1 for bad input / non-finite loss, with a one-line message on stderr).
  """
  from displacement_jax import cli  # pylint: disable=g-import-not-at-top

  flag_values, status = cli.parse_config_flags(
      argv, 'training', bools=[('resume', 'continue from the latest checkpoint in output_dir')])
  if flag_values is None:
    return status
  try:
    run(flag_values.config, resume=flag_values.resume)
  except (ValueError, FileNotFoundError, NonFiniteLossError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
