"""Reference log-probs: one pass with the initial params before training (`compute_or_load`), cached as npz.

The cache file name is a sha256 of the model identity (HF path or tiny spec + seed, dtypes, special
tokens), the tokenized data (ids of every row, which covers the rows, tokenizer, format and max_length)
and anything else the caller passes; a later run with the same key loads the arrays instead of
recomputing them. Training never holds reference params on device: only these per-row numbers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Callable, Mapping

import jax
import ml_collections
import numpy as np

from displacement_jax import rundir, runtime, sharding
from displacement_jax.train import monitor as evaluation
from displacement_jax.data import batching
from displacement_jax.data.layout import fill_rows, plan_batches, round_up

CACHE_PREFIX = "reference_"


def cache_key(**parts: Any) -> str:
  """A stable sha256 hex key of JSON-able `parts` (sorted keys)."""
  blob = json.dumps(parts, sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()


def cache_path(cache_dir: str, key: str) -> str:
  return os.path.join(cache_dir, f"{CACHE_PREFIX}{key[:32]}.npz")


def load_cache(cache_dir: str, key: str, *, log: Callable[[str], None] = logging.info) -> dict[str, np.ndarray] | None:
  """The cached arrays for `key`, or None when absent, written under another key, or corrupt (a cut or damaged
  file: said in one line naming it, and recomputed by the caller)."""
  path = cache_path(cache_dir, key)
  if not os.path.exists(path):
    return None
  try:
    arrays = rundir.read_npz(path)
  except rundir.CorruptFileError as e:
    log(f"reference log-probs: the cache {e}; computing them again")
    return None
  if str(arrays.pop("__key__", "")) != key:
    return None
  return arrays


def save_cache(cache_dir: str, key: str, arrays: Mapping[str, np.ndarray]) -> str:
  """Write arrays to the cache file of `key` (rundir.write_npz: atomically, through a temporary file of this
  process's own, so concurrent writers never clash); return its path."""
  return rundir.write_npz(cache_path(cache_dir, key), {"__key__": np.asarray(key), **arrays})


def cached_reference(
    cache_dir: str | None,
    key: str,
    compute: Callable[[], Mapping[str, np.ndarray]],
    *,
    log: Callable[[str], None] = logging.info,
) -> tuple[dict[str, np.ndarray], bool]:
  """(arrays, from_cache): load the arrays of `key` from `cache_dir` or compute and store them.

  `cache_dir=None` disables the cache (always computes, never writes). With several processes, process 0 alone
  reads and writes the cache: it decides hit or miss for all, a hit reaches the others by broadcast (their disks
  need not hold the file), and on a miss all compute (`compute` is collective) and process 0 writes.
  """
  if cache_dir:
    arrays = sharding.broadcast_from_main(load_cache(cache_dir, key, log=log) if sharding.is_main_process() else None)
    if arrays is not None:
      log(f"reference log-probs: reusing cache {cache_path(cache_dir, key)}")
      return arrays, True
  arrays = {k: np.asarray(v) for k, v in compute().items()}
  if cache_dir:
    path = save_cache(cache_dir, key, arrays) if sharding.is_main_process() else cache_path(cache_dir, key)
    log(f"reference log-probs: computed and cached to {path}")
  else:
    log("reference log-probs: computed (cache disabled)")
  return arrays, False


def compute_or_load(
    loaded: runtime.Loaded,
    dataset: runtime.Dataset,
    monitor_rows: np.ndarray,
    config: ml_collections.ConfigDict,
    fns: Any,
    mesh: Any,
    *,
    log: Callable[[str], None] = logging.info,
) -> tuple[dict[str, np.ndarray], bool]:
  """(arrays, from_cache): reference log-probs of every pair, the monitor's own baseline, and in single-token
  mode the monitor's mean next-token distribution, all with the initial params, cached on disk.

  The pass runs over the pairs sorted by length, each batch packed like training's (`runtime.pack_for_logps`,
  bucketed lengths: one compile per bucket, little padding). The monitor baseline goes
  through `fns.monitor` on exactly the batch `evaluation.Monitor` evaluates later (zeros standing in for the
  reference values), so its change at step 0 is exactly 0; `fns.next_token` gives single-token mode's baseline.
  """
  key = cache_key(
      model=loaded.identity,
      data=rundir.hash_pairs(dataset.pairs),
      data_path=config.data.path,
      n=len(dataset.pairs),
      max_length=int(config.data.max_length),
      format=config.data.format,
      single_token=bool(config.data.single_token),
      monitor_rows=rundir.hash_arrays([monitor_rows]),
      chunk=int(config.logprob_chunk_size),
      monitor_baseline=2,
  )
  cache_dir = None
  if config.reference.get("cache", True):
    cache_dir = config.reference.get("cache_dir") or os.path.join(config.output_dir, "reference_cache")
  dp = sharding.data_parallel_size(mesh)
  put = lambda b: sharding.global_batch_to_devices(b, mesh)

  def compute() -> dict[str, np.ndarray]:
    bs = round_up(int(config.reference.get("batch_size") or max(config.batch_size // config.optim.grad_accum, 1)), dp)
    n = len(dataset.pairs)
    chosen, rejected = np.zeros(n, np.float32), np.zeros(n, np.float32)

    def build(rows, _):
      batch = runtime.pack_for_logps(
          runtime.collate([dataset.pairs[i] for i in fill_rows(rows, bs)], dataset.pad_id, config),
          dataset.pad_id,
          config,
          groups=dp,
      )
      return batch, batch

    lengths = [batching.packed_length(p) for p in dataset.pairs]
    for rows, _, out in runtime.batched_pass(
        fns.logps,
        loaded.params,
        plan_batches(lengths, bs, max(lengths)),
        build,
        put,
        desc="reference",
        progress=bool(config.get("progress", True)),
    ):
      chosen[rows] = out["chosen_logps_B"][: len(rows)]
      rejected[rows] = out["rejected_logps_B"][: len(rows)]
    arrays = {"chosen_ref_logps": chosen, "rejected_ref_logps": rejected}
    placeholder = {"chosen_ref_logps": np.zeros(n, np.float32), "rejected_ref_logps": np.zeros(n, np.float32)}
    two_side = evaluation.monitor_batch(dataset, monitor_rows, config, dp, placeholder)
    base = jax.device_get(
        fns.monitor(loaded.params, put(evaluation.packed_monitor_batch(two_side, dataset, config, dp)))
    )
    arrays["monitor_chosen_ref_logps"] = np.asarray(base["chosen_logps_B"][: len(monitor_rows)], np.float32)
    arrays["monitor_rejected_ref_logps"] = np.asarray(base["rejected_logps_B"][: len(monitor_rows)], np.float32)
    if fns.next_token is not None:
      probs = np.asarray(jax.device_get(fns.next_token(loaded.params, put(two_side)))["prob_BV"])[: len(monitor_rows)]
      arrays["monitor_ref_prob_V"] = probs.mean(0)
    return arrays

  return cached_reference(cache_dir, key, compute, log=log)
