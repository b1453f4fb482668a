"""Preference training as a library call: `run(config, *, resume=False) -> RunResult` (configs/base.py).

One run: check the config -> mesh -> load model + tokenizer -> load, tokenize and check the data (truncations
counted and reported) -> jitted, mesh-sharded functions -> reference log-probs with the initial params (cached
on disk) -> train steps (gradient accumulation inside the step) with metrics.jsonl / TensorBoard / tqdm, the
displacement monitor every `eval.every` steps and orbax checkpoints every `checkpoint.every` steps -> optional
HF export. Experiments and the demo call `run`; it never calls them (the CLI is displacement_jax.train).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from displacement_jax import checkpoint as checkpoint_lib
from displacement_jax import config_checks, evaluation, forward, train_plot
from displacement_jax import metrics as metrics_lib
from displacement_jax import monitor as monitor_lib
from displacement_jax import optim as optim_lib
from displacement_jax import reference as reference_lib
from displacement_jax import interrupts as interrupts_lib
from displacement_jax import lora_train
from displacement_jax import rundir, runlock, runtime, sharding, step as step_lib
from displacement_jax.data import batching
from displacement_jax.errors import Interrupted, UsageError
from displacement_jax.models import io as io_lib
from displacement_jax.models import loading as loading_lib

HF_DIR = "hf"  # the HF export, under output_dir
EXPORT_MANIFEST = "export.json"  # written last into the export: its files' checksums and the params' sha256
TENSORBOARD_DIR = "tensorboard"


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN/inf; a checkpoint of the last state was written before raising."""


class ExportError(OSError):
  """The HF export failed; the checkpoints are kept and `--resume` exports again."""


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
    return [row["loss"] for row in self.metrics if "loss" in row]


def log(msg: str) -> None:
  """Print a line on process 0 (above any tqdm bar) and log it."""
  logging.info(msg)
  if jax.process_index() == 0:
    tqdm.write(msg, file=sys.stdout)


# ---------------------------------------------------------------------------------------------- the run


def run(config: ml_collections.ConfigDict, *, resume: bool = False) -> RunResult:
  """Train with `config` (see configs/base.py); `resume=True` continues from the newest usable checkpoint.

  Before any model is loaded: the config is checked, output_dir is locked (runlock: a second run exits 2), a
  fresh run refuses an earlier run's checkpoints unless config.overwrite, and --resume compares the config
  with the checkpoint's (`check_resume_config`). SIGTERM / SIGINT raise `errors.Interrupted`; during the steps
  the current step is finished and checkpointed first (interrupts.Interrupts).
  """
  config_checks.check_train(config)
  mesh = sharding.mesh_from_config(config.mesh, config.get("distributed"))
  check_batch_fits_mesh(config, mesh)
  os.makedirs(config.output_dir, exist_ok=True)
  with interrupts_lib.Interrupts() as interrupts:
    with runlock.hold(config.output_dir, "train", enabled=jax.process_index() == 0, log=log):
      with open_checkpointer(config, resume) as ckpt:
        resumed_from = check_resume_config(ckpt, config) if resume else None
        try:
          return train(config, mesh, ckpt, resumed_from, interrupts)
        except OSError as e:
          if e.filename is None and e.strerror:  # a write through a file object: name the dir it was writing in
            raise OSError(e.errno, e.strerror, config.output_dir) from e
          raise


def train(
    config: ml_collections.ConfigDict,
    mesh: Any,
    ckpt: checkpoint_lib.Checkpointer,
    resumed_from: tuple[int, dict[str, Any]] | None,
    interrupts: interrupts_lib.Interrupts,
) -> RunResult:
  """The body of `run` once output_dir is locked: `resumed_from` is (step, meta) of the checkpoint to resume."""
  resume = resumed_from is not None
  loaded = runtime.load_model(config, mesh)
  log(loaded.setup_line)
  dataset = runtime.load_data(config, loaded.tokenizer, loaded.model_config.vocab_size)
  log(f"data: {len(dataset.pairs)} pairs from {config.data.path}; truncation: {dataset.truncation}")
  for warning in dataset.checks.warnings(str(config.data.path)):
    log(warning)
  identity = data_identity(dataset, config)
  if resume:
    check_resume_data(resumed_from, identity, config)
  iterator = make_iterator(dataset, config, mesh)
  total_steps = num_train_steps(config, iterator.steps_per_epoch)
  shapes = iterator.packed_shapes(iterator.epoch)
  if shapes:
    log(
        f"train step shapes (rows, slots, response slots), one compile each: {len(shapes)} in epoch "
        f"{iterator.epoch}: {shapes}"
    )
  fns = make_fns(loaded, config, mesh, total_steps)
  loaded.params = jax.device_put(loaded.params, fns.param_sh)
  monitor_rows = np.arange(min(len(dataset.pairs), int(config.eval.get("max_samples", 256))))
  ref, from_cache = reference_lib.compute_or_load(loaded, dataset, monitor_rows, config, fns, mesh, log=log)
  state = fns.init_state(loaded.params)
  log(checkpoint_size_line(state, config, total_steps))
  del loaded.params  # no reference params stay on device: the state holds the (only) copy
  state, start_step, meta = restore_if_resuming(ckpt, state, iterator, resumed_from, config)
  if resume and start_step >= total_steps:
    log(f"the run in {config.output_dir} is already complete (step {start_step} of {total_steps}); nothing to do")
    params, hf_dir = host_params(state.params), os.path.join(config.output_dir, HF_DIR)
    if config.get("export_hf"):
      stale = export_problem(hf_dir, params)
      if stale:  # killed before or during it, or the export of another run
        log(f"{hf_dir}: {stale}; exporting this run's params")
        export_hf(params, loaded, hf_dir, progress=bool(config.progress))
    return RunResult(params, start_step, config.output_dir, [], {}, from_cache, dataset.truncation)
  writer = metrics_lib.MetricsWriter(
      config.output_dir, enabled=jax.process_index() == 0, truncate_after_step=start_step if resume else None, log=log
  )
  writer.write(
      start_step,
      {
          "event": "resume" if resume else "start",
          "total_steps": total_steps,
          "reference_from_cache": from_cache,
          "data/format": loaded.identity["data_format"],
          "model/added_tokens": loaded.identity["added_tokens"],
          "model/vocab_size": loaded.model_config.vocab_size,
          **{f"data/{k}": v for k, v in dataset.truncation.items()},
          **{f"data/{k}": v for k, v in dataset.checks.record().items()},
      },
  )
  monitor = evaluation.Monitor(fns, loaded, dataset, monitor_rows, ref, config, mesh)
  run_info = {"config": config_json(config), "data": identity, "total_steps": total_steps}
  loop = TrainLoop(config, fns, iterator, dataset, ref, mesh, ckpt, writer, monitor, total_steps, meta, run_info)
  try:
    with interrupts.deferred():
      state, step, rows, stopped_early = loop(state, start_step, resume, interrupts)
    ckpt.wait()  # the last checkpoint is written and verified (a failed save raises here)
  finally:
    writer.close()
  params = host_params(state.params)
  hf_dir = None
  if config.get("export_hf") and not stopped_early:  # every process takes part (gathers); process 0 writes
    hf_dir = export_hf(params, loaded, os.path.join(config.output_dir, HF_DIR), progress=bool(config.progress))
  return RunResult(
      params=params,
      step=step,
      output_dir=config.output_dir,
      metrics=rows,
      monitor=loop.last_monitor,
      reference_from_cache=from_cache,
      truncation=dataset.truncation,
      stopped_early=stopped_early,
      hf_dir=hf_dir,
  )


class TrainLoop:
  """The step loop of `run`: train step, NaN stop, monitor + warning, metrics row, progress bar, checkpoint."""

  def __init__(self, config, fns, iterator, dataset, ref, mesh, ckpt, writer, monitor, total_steps, meta, run_info):
    """`meta`: the restored checkpoint's meta on resume ({} for a fresh run); `run_info`: what every checkpoint
    records of the run (its config, data identity and length, compared by a later --resume)."""
    self.config, self.fns, self.iterator, self.dataset, self.ref, self.mesh = config, fns, iterator, dataset, ref, mesh
    self.ckpt, self.writer, self.monitor, self.total_steps = ckpt, writer, monitor, total_steps
    self.run_info = run_info
    self.last_monitor: dict[str, Any] = {}
    self.prev_eval = dict(meta.get("monitor_prev", {}))
    self.num_tokens = int(meta.get("num_tokens", 0))  # TRL's num_tokens: cumulative, restored on resume
    self.schedule = optim_lib.make_schedule(
        config.optim.get("schedule", "constant"),
        float(config.optim.lr),
        total_steps,
        int(config.optim.get("warmup_steps", 0)),
    )

  def save(self, step: int, state: step_lib.TrainState, data_state: dict[str, int] | None = None) -> None:
    """Checkpoint `state` at `step` (asynchronously); a failed save (this one or the one before) stops the run."""
    meta = {
        "step": step,
        "data": data_state or self.iterator.state(),
        "monitor_prev": self.prev_eval,
        "num_tokens": self.num_tokens,
        "run": self.run_info,
    }
    try:
      self.ckpt.save(step, state, meta)
    except checkpoint_lib.CheckpointWriteError as e:
      raise checkpoint_lib.CheckpointWriteError(f"{e}; training stopped at step {step}") from e

  def __call__(
      self, state: step_lib.TrainState, start_step: int, resume: bool, interrupts: interrupts_lib.Interrupts
  ) -> tuple[step_lib.TrainState, int, list[dict[str, Any]], bool]:
    config, rows = self.config, []
    if not resume:
      self.last_monitor = self.monitor(state.params, 0)
      log(monitor_lib.format_line(0, self.last_monitor))
      self.prev_eval = {"loss": self.last_monitor["monitor/loss"], "preferred": None}
      rows.append(self.writer.write(0, self.last_monitor))
      self.plot()
    eval_every, ckpt_every = int(config.eval.every), int(config.checkpoint.every)
    at_end = bool(config.checkpoint.get("at_end", True))
    stop_after = int(config.debug.get("stop_after_steps", 0))
    bar = metrics_lib.progress_bar(
        self.total_steps, start_step, enabled=bool(config.get("progress", True)) and jax.process_index() == 0
    )
    stopped_early, step = False, start_step
    try:
      for step in range(start_step + 1, self.total_steps + 1):
        self.check_checkpoints(step)
        data_before = self.iterator.state()
        local = next(self.iterator)
        batch = evaluation.add_reference(local, positions(local, self.dataset), self.ref)
        state, step_metrics = self.fns.train_step(state, sharding.host_local_batch_to_global(batch, self.mesh))
        step_metrics = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        self.num_tokens += int(step_metrics.pop("tokens"))
        nonfinite = int(step_metrics.pop("nonfinite"))
        if nonfinite:  # the step skipped its update: `state` is the last good one (all params finite)
          self.stop_on_nonfinite(step, state, step_metrics, data_before, step_lib.NONFINITE[nonfinite])
        row = dict(step_metrics, **self.trl_progress(step))
        if eval_every > 0 and step % eval_every == 0 or step == self.total_steps:
          row.update(self.evaluate(step, state))
        if step % int(config.get("log_every", 1) or 1) == 0 or step == self.total_steps or "monitor/loss" in row:
          rows.append(self.writer.write(step, row))
        if "monitor/loss" in row:
          self.plot()
        bar.set_postfix(metrics_lib.postfix(step_metrics, ("loss", "logps/chosen_change")))
        bar.update(1)
        if ckpt_every > 0 and step % ckpt_every == 0 or step == self.total_steps and at_end or step == stop_after:
          self.save(step, state)
        if stop_after and step >= stop_after and step < self.total_steps:
          stopped_early = True
          log(f"debug.stop_after_steps={stop_after}: stopping at step {step}")
          break
        signum = interrupts.pending()
        if signum:
          self.stop_on_signal(step, state, signum)
    finally:
      bar.close()
    return state, step, rows, stopped_early

  def stop_on_signal(self, step: int, state: step_lib.TrainState, signum: int) -> None:
    """Checkpoint `state` (the step just finished), wait until it is written and verified, raise Interrupted."""
    if self.ckpt.latest_step() != step:
      self.save(step, state)
    self.ckpt.wait()
    raise Interrupted(
        signum,
        f"stopped by {interrupts_lib.signal_name(signum)} after step {step} of {self.total_steps}: checkpoint {step} "
        f"is written in {self.ckpt.directory}; continue with --resume",
    )

  def trl_progress(self, step: int) -> dict[str, float]:
    """TRL's progress keys: learning_rate (the rate this step used), num_tokens (cumulative non-padding tokens of
    chosen + rejected sequences) and epoch as fractional progress (epoch index + batches done / per epoch)."""
    it = self.iterator
    return {
        "learning_rate": float(self.schedule(step - 1)),
        "num_tokens": self.num_tokens,
        "epoch": it.epoch + it.step / it.steps_per_epoch,
    }

  def evaluate(self, step: int, state: step_lib.TrainState) -> dict[str, Any]:
    """The monitor at `step`, its line, and the displacement warning."""
    self.last_monitor = self.monitor(state.params, step)
    log(monitor_lib.format_line(step, self.last_monitor))
    warning = evaluation.warning_after(step, self.last_monitor, self.prev_eval, self.config)
    if warning:
      log(warning)
      self.last_monitor["monitor/warning"] = warning
    more = evaluation.more_warnings(step, self.last_monitor, self.prev_eval, self.config)
    for line in more:
      log(line)
    if more:
      self.last_monitor["monitor/warnings"] = more
    preferred = self.last_monitor["monitor/preferred_logprob_change"]
    self.prev_eval = {
        "loss": self.last_monitor["monitor/loss"],
        "preferred": preferred,
        "share": self.last_monitor["monitor/share_preferred_fell"],
        "peak": max(preferred, self.prev_eval.get("peak", preferred)),
    }
    return self.last_monitor

  def plot(self) -> None:
    """output_dir/displacement.png from metrics.jsonl (train_plot; process 0, after each evaluation)."""
    if self.writer.enabled:
      train_plot.plot_displacement(
          metrics_lib.read_metrics(self.writer.path), os.path.join(self.config.output_dir, train_plot.PLOT_FILE)
      )

  def check_checkpoints(self, step: int) -> None:
    """Stop at once, in one line naming the directory, when an asynchronous checkpoint save has failed."""
    try:
      self.ckpt.poll()
    except checkpoint_lib.CheckpointWriteError as e:
      raise checkpoint_lib.CheckpointWriteError(f"{e}; training stopped before step {step}") from e

  def stop_on_nonfinite(
      self,
      step: int,
      state: step_lib.TrainState,
      step_metrics: dict[str, float],
      data_before: dict[str, int],
      quantity: str,
  ) -> None:
    """Checkpoint the last good state and raise NonFiniteLossError naming the first non-finite quantity."""
    if self.ckpt.latest_step() != step - 1:
      self.save(step - 1, state, data_before)
    self.ckpt.wait()
    self.writer.write(step, step_metrics)
    loss, grad_norm = step_metrics["loss"], step_metrics["grad_norm"]
    what, finite = {
        "loss": (f"loss {loss}", ""),
        "gradient norm": (f"gradient norm {grad_norm}", f"the loss {loss:.6g} was finite; "),
    }.get(quantity, (quantity, f"the loss {loss:.6g} and the gradient norm {grad_norm:.6g} were finite; "))
    raise NonFiniteLossError(
        f"non-finite {what} at step {step} ({finite}lr={self.config.optim.lr}, objective={self.config.loss.objective}); "
        f"stopped, the state before this step (all params finite) is checkpointed at step {step - 1} in "
        f"{self.ckpt.directory}"
    )


# ------------------------------------------------------------------------------------------------- steps


def check_batch_fits_mesh(config: ml_collections.ConfigDict, mesh: Any) -> None:
  """Every micro-batch must split evenly over the data-parallel devices."""
  dp = sharding.data_parallel_size(mesh)
  if config.batch_size % (dp * int(config.optim.grad_accum)):
    raise ValueError(
        f"config.batch_size={config.batch_size} must be a multiple of optim.grad_accum="
        f"{config.optim.grad_accum} x the data-parallel mesh size {dp} (mesh.data x mesh.fsdp, all "
        "hosts), so every micro-batch splits evenly over the devices"
    )


def make_iterator(dataset: runtime.Dataset, config: ml_collections.ConfigDict, mesh: Any) -> batching.BatchIterator:
  """The seeded, resumable batch iterator (data.batching.BatchIterator) giving this host its rows.

  Full global batches only (drop_last): every step averages over exactly `batch_size` real pairs. Packed rows
  hold up to data.pairs_per_row pairs, planned per data-parallel device and micro-batch (packing.pack_pairs).
  """
  if len(dataset.pairs) < int(config.batch_size):
    raise ValueError(
        f"the data ({config.data.path}) has {len(dataset.pairs)} pairs, fewer than "
        f"config.batch_size={config.batch_size}"
    )
  return batching.BatchIterator(
      dataset.pairs,
      int(config.batch_size),
      seed=int(config.seed),
      shuffle=bool(config.data.get("shuffle", True)),
      drop_last=True,
      pad_id=dataset.pad_id,
      padding_side=config.data.get("padding_side", "right"),
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      shared_prompt_packing=runtime.packing_enabled(config),
      pairs_per_row=runtime.pairs_per_row(config),
      data_shards=max(sharding.data_parallel_size(mesh) // jax.process_count(), 1),
      micro_batches=int(config.optim.grad_accum),
      rows_log=(
          os.path.join(config.output_dir, f"rows_process{jax.process_index()}.jsonl")
          if config.debug.get("log_rows")
          else None
      ),
  )


def num_train_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """config.num_steps when > 0, else num_epochs full passes."""
  if config.num_steps > 0:
    return int(config.num_steps)
  return int(config.num_epochs) * int(steps_per_epoch)


@dataclasses.dataclass
class Fns:
  """The jitted, mesh-sharded functions of one run and their shardings."""

  logps: Callable
  next_token: Callable | None
  unembed: Callable
  monitor: Callable
  init_state: Callable
  train_step: Callable
  param_sh: Any
  batch_sh: Any


def make_fns(loaded: runtime.Loaded, config: ml_collections.ConfigDict, mesh: Any, total_steps: int) -> Fns:
  """jit every function of the run with its shardings (params by `sharding.param_shardings`, batches over
  ('data', 'fsdp'), outputs replicated); the train step donates its state. LoRA: lora_train.make_fns."""
  if lora_train.enabled(config):
    return Fns(**lora_train.make_fns(loaded, config, mesh, total_steps))
  model, chunk = loaded.model, int(config.logprob_chunk_size)
  param_sh = sharding.param_shardings(loaded.params, mesh)
  replicated = NamedSharding(mesh, P())
  batch_sh = sharding.batch_sharding(mesh)
  jit = lambda f: jax.jit(f, in_shardings=(param_sh, batch_sh), out_shardings=replicated)
  optimizer = optim_lib.make_optimizer(config.optim, total_steps)
  loss_fn = step_lib.make_loss_fn(model, config.loss, chunk)
  opt_sh = optax_state_shardings(optimizer, loaded.params, param_sh, replicated)
  state_sh = step_lib.TrainState(params=param_sh, opt_state=opt_sh, step=replicated, rng=replicated)
  init_state = jax.jit(
      lambda p: step_lib.TrainState(
          params=p,
          opt_state=optimizer.init(p),
          step=jnp.zeros((), jnp.int32),
          rng=jax.random.key_data(jax.random.key(int(config.seed))),
      ),
      in_shardings=(param_sh,),
      out_shardings=state_sh,
      donate_argnums=0,
  )
  train_step = jax.jit(
      step_lib.make_train_step(loss_fn, optimizer, int(config.optim.grad_accum), config.optim.get("guard", "state")),
      in_shardings=(state_sh, batch_sh),
      out_shardings=(state_sh, replicated),
      donate_argnums=0,
  )
  return Fns(
      logps=jit(lambda p, b: forward.pair_logps(model, p, b, chunk)),
      next_token=jit(lambda p, b: forward.next_token_outputs(model, p, b)) if config.data.single_token else None,
      unembed=jax.jit(lambda p: forward.unembed(model, p), in_shardings=(param_sh,), out_shardings=replicated),
      monitor=jit(evaluation.make_monitor_fn(model, config.loss, chunk)),
      init_state=init_state,
      train_step=train_step,
      param_sh=param_sh,
      batch_sh=batch_sh,
  )


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
      "sha256": reference_lib.hash_pairs(dataset.pairs),
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
  diff = ", ".join(f"{k} {stored.get(k)!r} -> {identity.get(k)!r}" for k in identity if stored.get(k) != identity[k])
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


def positions(batch: dict[str, np.ndarray], dataset: runtime.Dataset) -> np.ndarray:
  """Positions in dataset.pairs of the rows of a collated batch (from its index_B)."""
  return np.asarray([dataset.position_of[int(i)] for i in batch["index_B"]], np.int64)


def optax_state_shardings(optimizer: Any, params: Any, param_sh: Any, replicated: NamedSharding) -> Any:
  """Shardings of the optimizer state: param-shaped leaves follow their param, the rest is replicated."""
  abstract = jax.eval_shape(optimizer.init, params)
  return optax.tree_map_params(
      optimizer, lambda _, sh: sh, abstract, param_sh, transform_non_params=lambda _: replicated
  )


def host_params(params: Any) -> Any:
  """Numpy copy of (possibly sharded, multi-host) params on every host."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top  (multi-host only)

    return multihost_utils.process_allgather(params, tiled=True)
  return jax.device_get(params)


def params_digest(params: Any) -> str:
  """sha256 of every leaf of a (host numpy) param tree: what an export's manifest records of its params."""
  return reference_lib.hash_arrays(np.asarray(x) for x in jax.tree.leaves(params))


def export_problem(hf_dir: str, params: Any) -> str | None:
  """None when `hf_dir` is a complete export of `params` (its manifest, written last, verifies and names these
  params), else what is wrong with it."""
  if not os.path.isdir(hf_dir):
    return "no export"
  record = rundir.read_manifest(hf_dir, EXPORT_MANIFEST)
  if record is None:
    return f"no readable {EXPORT_MANIFEST}: the export never completed"
  if record.get("params_sha256") != params_digest(params):
    return "it holds other params than this run's (an earlier run's export)"
  return rundir.check_digests(hf_dir, EXPORT_MANIFEST)


def export_hf(params: Any, loaded: runtime.Loaded, out_dir: str, *, progress: bool = True) -> str:
  """Save the trained params, the tokenizer and the source's generation config in HF format
  (models.io.save_pretrained): what the source checkpoint had, nothing of how this machine loaded it.

  Written into `out_dir`.partial, completed by its manifest (EXPORT_MANIFEST: checksums and the params' sha256,
  written last), then renamed to `out_dir`: an `out_dir` is always a complete export. A failure raises
  ExportError in one line (the checkpoints are kept; --resume exports again).
  """
  partial, writer = out_dir + ".partial", jax.process_index() == 0
  try:
    if writer:
      shutil.rmtree(partial, ignore_errors=True)
    if loaded.lora is not None:  # a PEFT adapter directory (+ merged/ with model.lora.merge)
      lora_train.save(params, loaded, partial, progress=progress)
    else:
      io_lib.save_pretrained(params, loaded.model_config, partial, progress=progress)
    if writer:
      if hasattr(loaded.tokenizer, "save_pretrained"):
        loaded.tokenizer.save_pretrained(partial)
      source = loaded.identity.get("path")
      generation = loading_lib.generation_config(source, loaded.model_config) if source else None
      if generation is not None:
        rundir.write_json(os.path.join(partial, "generation_config.json"), generation, indent=2)
      rundir.write_digests(partial, EXPORT_MANIFEST, params_sha256=params_digest(params))
      rundir.replace_dir(partial, out_dir)
  except Interrupted:
    raise
  except Exception as e:  # pylint: disable=broad-except  (any failure: one line, the run's checkpoints are kept)
    lines = [line for line in str(e).splitlines() if line.strip()]
    reason = f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    raise ExportError(
        f"the HF export to {out_dir} failed ({reason}); the checkpoints are kept: --resume exports again"
    ) from e
  log(f"exported HF model to {out_dir}")
  return out_dir
