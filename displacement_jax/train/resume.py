"""Starting or resuming a training run, before any model is loaded.

`open_checkpointer` refuses (or with config.overwrite, clears) an earlier run's checkpoints in a fresh run;
`check_resume_config` / `check_resume_data` compare the config and the data with the checkpoint's
(`config_json` and `data_identity` are what every checkpoint records of its run); `restore_if_resuming`
restores the newest usable checkpoint and the data iterator.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import ml_collections

from displacement_jax import rundir, runtime
from displacement_jax.config import checks as config_checks
from displacement_jax.errors import UsageError
from displacement_jax.train import checkpoint as checkpoint_lib
from displacement_jax.train import step as step_lib
from displacement_jax.train.export import HF_DIR
from displacement_jax.train.metrics import TENSORBOARD_DIR, log


def open_checkpointer(config: ml_collections.ConfigDict, resume: bool) -> checkpoint_lib.Checkpointer:
  """The run's Checkpointer. A fresh run (no --resume) into a directory holding an earlier run's checkpoints is
  refused (UsageError) unless config.overwrite, which removes them first, with that run's HF export and
  TensorBoard events (said in one line): never silently."""
  ckpt_dir = os.path.join(config.output_dir, checkpoint_lib.CHECKPOINT_DIR)
  earlier = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit()) if os.path.isdir(ckpt_dir) else []
  if not resume and earlier:
    if not config.get("overwrite"):
      raise UsageError(
          f"output_dir {config.output_dir} holds the checkpoints of an earlier run (steps "
          f'{", ".join(map(str, earlier))}): pass --resume to continue it, or --config.overwrite=True to replace it'
      )
    if jax.process_index() == 0:
      stale = [
          d
          for d in (HF_DIR, HF_DIR + ".partial", TENSORBOARD_DIR)
          if os.path.exists(os.path.join(config.output_dir, d))
      ]
      also = f" and its {', '.join(d + '/' for d in stale)}" if stale else ""
      log(f"fresh run with config.overwrite=True: removing the earlier run's checkpoints in {ckpt_dir}{also}")
      shutil.rmtree(ckpt_dir)
      for d in stale:
        shutil.rmtree(os.path.join(config.output_dir, d))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top  (multi-host only)

      multihost_utils.sync_global_devices("train: old checkpoints removed")
  return checkpoint_lib.Checkpointer(
      ckpt_dir, keep=int(config.checkpoint.keep), async_save=bool(config.checkpoint.get("async_save", True))
  )


def checkpoint_size_line(state: Any, config: ml_collections.ConfigDict, total_steps: int) -> str:
  """One line at start: how big one checkpoint is (params + optimizer state), how many are written and kept."""
  size = sum(int(getattr(x, "nbytes", 0)) for x in jax.tree.leaves(state))
  every, keep = int(config.checkpoint.every), int(config.checkpoint.keep)
  at_end = bool(config.checkpoint.get("at_end", True))
  saves = (total_steps // every if every > 0 else 0) + int(at_end and (every <= 0 or total_steps % every != 0))
  if saves == 0:
    return f"checkpoints: none (checkpoint.every={every}, checkpoint.at_end=False); --resume will have nothing"
  return (
      f"checkpoints: {size / 2**20:,.0f} MiB each (params + optimizer state), {saves} to write, the newest "
      f"{keep} kept (checkpoint.keep) in {os.path.join(config.output_dir, checkpoint_lib.CHECKPOINT_DIR)}; "
      "--config.checkpoint.at_end=False for a run that needs no --resume"
  )


def config_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as plain JSON (what a checkpoint records of the run)."""
  return json.loads(config.to_json_best_effort())


def data_identity(dataset: runtime.Dataset, config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What a checkpoint records of the training data: its path, size and a sha256 of every tokenized pair."""
  return {
      "path": str(config.data.path),
      "num_pairs": len(dataset.pairs),
      "sha256": rundir.hash_pairs(dataset.pairs),
  }


def check_resume_config(ckpt: checkpoint_lib.Checkpointer, config: ml_collections.ConfigDict) -> tuple[int, dict]:
  """(step, meta) of the newest verified checkpoint, checked before any model is loaded: the differences between
  `config` and the config it was trained with are printed, and those that alter the optimisation are refused
  (UsageError) unless config.resume_allow_changes. No verified checkpoint: NoUsableCheckpointError."""
  step, meta = ckpt.newest_meta()
  compare_config(step, meta, config)
  return step, meta


def compare_config(step: int, meta: dict[str, Any], config: ml_collections.ConfigDict) -> None:
  """`check_resume_config` for the meta of checkpoint `step`."""
  stored = meta.get("run", {}).get("config")
  if stored is None:
    log(f"--resume: checkpoint {step} records no config (written by an older version); not compared")
    return
  refused, allowed = config_checks.resume_changes(stored, config)
  for line in allowed:
    log(f"--resume: config differs from checkpoint {step}'s: {line}")
  if refused and not config.get("resume_allow_changes"):
    raise UsageError(
        f"--resume: the config differs from the one checkpoint {step} was trained with in fields that change the "
        f'optimisation: {"; ".join(refused)}. Use another output_dir, or pass --config.resume_allow_changes=True '
        "to continue anyway"
    )
  for line in refused:
    log(f"--resume: config differs from checkpoint {step}'s (allowed by config.resume_allow_changes): {line}")


def check_resume_data(
    resumed_from: tuple[int, dict[str, Any]], identity: dict[str, Any], config: ml_collections.ConfigDict
) -> None:
  """Refuse (UsageError) training data other than the checkpoint's, unless config.resume_allow_changes."""
  step, meta = resumed_from
  stored = meta.get("run", {}).get("data")
  if stored is None or stored == identity:
    return
  diff = ", ".join(rundir.identity_changes(stored, identity, keys=identity))
  if not config.get("resume_allow_changes"):
    raise UsageError(
        f"--resume: the training data differs from checkpoint {step}'s ({diff}). Use another output_dir, or pass "
        "--config.resume_allow_changes=True to continue anyway"
    )
  log(f"--resume: the training data differs from checkpoint {step}'s (allowed by config.resume_allow_changes): {diff}")


def restore_if_resuming(
    ckpt: checkpoint_lib.Checkpointer,
    state: step_lib.TrainState,
    iterator: Any,
    resumed_from: tuple[int, dict[str, Any]] | None,
    config: ml_collections.ConfigDict,
) -> tuple[step_lib.TrainState, int, dict[str, Any]]:
  """(state, start step, checkpoint meta): from the newest usable checkpoint when resuming (a corrupt one is
  reported and the next older one used), else (state, 0, {})."""
  if resumed_from is None:
    return state, 0, {}
  state, meta, start_step = ckpt.restore_latest(state, log=log)
  if start_step != resumed_from[0]:  # fell back past the checkpoint whose config was compared
    compare_config(start_step, meta, config)
  iterator.restore(meta["data"])
  log(f"resumed from step {start_step} ({ckpt.directory})")
  return state, start_step, meta
