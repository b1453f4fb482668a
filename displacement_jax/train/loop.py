"""Preference training as a library call: `run(config, *, resume=False) -> RunResult` (configs/base.py).

One run: check the config -> mesh -> load model + tokenizer -> load, tokenize and check the data (truncations
counted and reported) -> jitted, mesh-sharded functions -> reference log-probs with the initial params (cached
on disk) -> train steps (gradient accumulation inside the step) with metrics.jsonl / TensorBoard / tqdm, the
displacement monitor every `eval.every` steps and orbax checkpoints every `checkpoint.every` steps -> optional
HF export. Experiments and the demo call `run`; it never calls them (the CLI is displacement_jax.train).

This module holds the orchestration (`run`, `train`) and the step loop (`TrainLoop`); the jitted functions are
built in train/fns.py, the start / resume checks live in train/resume.py and the HF export in train/export.py.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np

from displacement_jax import displacement as monitor_lib
from displacement_jax import interrupts as interrupts_lib
from displacement_jax import rundir, runtime, sharding
from displacement_jax.config import checks as config_checks
from displacement_jax.data import batching
from displacement_jax.errors import Interrupted
from displacement_jax.train import checkpoint as checkpoint_lib
from displacement_jax.train import export as export_lib
from displacement_jax.train import fns as fns_lib
from displacement_jax.train import metrics as metrics_lib
from displacement_jax.train import monitor as evaluation
from displacement_jax.train import optim as optim_lib
from displacement_jax.train import plot as train_plot
from displacement_jax.train import reference as reference_lib
from displacement_jax.train import resume as resume_lib
from displacement_jax.train import step as step_lib
from displacement_jax.train.metrics import log


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
    return [row["loss"] for row in self.metrics if "loss" in row]


# ---------------------------------------------------------------------------------------------- the run


def run(config: ml_collections.ConfigDict, *, resume: bool = False) -> RunResult:
  """Train with `config` (see configs/base.py); `resume=True` continues from the newest usable checkpoint.

  Before any model is loaded: the config is checked, output_dir is locked (rundir.hold: a second run exits 2), a
  fresh run refuses an earlier run's checkpoints unless config.overwrite, and --resume compares the config
  with the checkpoint's (`check_resume_config`). SIGTERM / SIGINT raise `errors.Interrupted`; during the steps
  the current step is finished and checkpointed first (interrupts.Interrupts).
  """
  config_checks.check_train(config)
  mesh = sharding.mesh_from_config(config.mesh, config.get("distributed"))
  check_batch_fits_mesh(config, mesh)
  os.makedirs(config.output_dir, exist_ok=True)
  with interrupts_lib.Interrupts() as interrupts:
    with rundir.hold(config.output_dir, "train", enabled=jax.process_index() == 0, log=log):
      with resume_lib.open_checkpointer(config, resume) as ckpt:
        resumed_from = resume_lib.check_resume_config(ckpt, config) if resume else None
        try:
          return train(config, mesh, ckpt, resumed_from, interrupts)
        except OSError as e:
          if e.filename is None and e.strerror:  # a write through a file object: name the dir it was writing in
            raise OSError(e.errno, e.strerror, config.output_dir) from e
          raise


def audit_monitor(
    fns: fns_lib.Fns,
    loaded: runtime.Loaded,
    dataset: runtime.Dataset,
    rows: np.ndarray,
    ref: dict[str, np.ndarray],
    config: ml_collections.ConfigDict,
    mesh: Any,
    total_steps: int,
) -> dict[str, np.ndarray]:
  """eval.audit: the audit's predictions for the monitored rows (`evaluation.audit_predictions`), its batches
  those of the run (a second iterator of the same seed), logged with their cost."""
  batches = reference_batches(make_iterator(dataset, config, mesh), dataset, mesh, ref, total_steps)
  tic = time.perf_counter()
  predicted = evaluation.audit_predictions(
      fns, loaded, dataset, rows, ref, config, mesh, total_steps, (batch for _, batch in batches)
  )
  log(
      f"eval.audit: predicted d ln pi(y+) of the {len(rows)} monitored pairs over the run ({total_steps} steps "
      f"replayed at the initial params, {time.perf_counter() - tic:.1f} s): first order mean "
      f"{predicted['first_order'].mean():+.4f}, the model at theta0 + D mean {predicted['along_direction'].mean():+.4f}"
  )
  return predicted


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
  identity = resume_lib.data_identity(dataset, config)
  if resume:
    resume_lib.check_resume_data(resumed_from, identity, config)
  iterator = make_iterator(dataset, config, mesh)
  total_steps = num_train_steps(config, iterator.steps_per_epoch)
  shapes = iterator.packed_shapes(iterator.epoch)
  if shapes:
    log(
        f"train step shapes (rows, slots, response slots), one compile each: {len(shapes)} in epoch "
        f"{iterator.epoch}: {shapes}"
    )
  fns = fns_lib.make_fns(loaded, config, mesh, total_steps)
  loaded.params = jax.device_put(loaded.params, fns.param_sh)
  monitor_rows = np.arange(min(len(dataset.pairs), int(config.eval.get("max_samples", 256))))
  ref, from_cache = reference_lib.compute_or_load(loaded, dataset, monitor_rows, config, fns, mesh, log=log)
  predicted = None
  if config.eval.get("audit", False):  # before init_state donates the initial params
    predicted = audit_monitor(fns, loaded, dataset, monitor_rows, ref, config, mesh, total_steps)
  state = fns.init_state(loaded.params)
  log(resume_lib.checkpoint_size_line(state, config, total_steps))
  del loaded.params  # no reference params stay on device: the state holds the (only) copy
  state, start_step, meta = resume_lib.restore_if_resuming(ckpt, state, iterator, resumed_from, config)
  if resume and start_step >= total_steps:
    log(f"the run in {config.output_dir} is already complete (step {start_step} of {total_steps}); nothing to do")
    params, hf_dir = export_lib.host_params(state.params), os.path.join(config.output_dir, export_lib.HF_DIR)
    if config.get("export_hf"):
      stale = export_lib.export_problem(hf_dir, params)
      if stale:  # killed before or during it, or the export of another run
        log(f"{hf_dir}: {stale}; exporting this run's params")
        export_lib.export_hf(params, loaded, hf_dir, progress=bool(config.progress))
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
  monitor = evaluation.Monitor(fns, loaded, dataset, monitor_rows, ref, config, mesh, predicted)
  run_info = {"config": resume_lib.config_json(config), "data": identity, "total_steps": total_steps}
  loop = TrainLoop(config, fns, iterator, dataset, ref, mesh, ckpt, writer, monitor, total_steps, meta, run_info)
  try:
    with interrupts.deferred():
      state, step, rows, stopped_early = loop(state, start_step, resume, interrupts)
    ckpt.wait()  # the last checkpoint is written and verified (a failed save raises here)
  finally:
    writer.close()
  params = export_lib.host_params(state.params)
  hf_dir = None
  if config.get("export_hf") and not stopped_early:  # every process takes part (gathers); process 0 writes
    hf_dir = export_lib.export_hf(
        params, loaded, os.path.join(config.output_dir, export_lib.HF_DIR), progress=bool(config.progress)
    )
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


def reference_batches(
    iterator: batching.BatchIterator, dataset: runtime.Dataset, mesh: Any, ref: dict[str, np.ndarray], steps: int
) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
  """The next `steps` batches of `iterator` as training feeds them: (positions in dataset.pairs, the global batch
  with the reference log-probs `ref` of its rows)."""
  for _ in range(steps):
    local = next(iterator)
    where = positions(local, dataset)
    yield where, sharding.host_local_batch_to_global(evaluation.add_reference(local, where, ref), mesh)


def positions(batch: dict[str, np.ndarray], dataset: runtime.Dataset) -> np.ndarray:
  """Positions in dataset.pairs of the rows of a collated batch (from its index_B)."""
  return np.asarray([dataset.position_of[int(i)] for i in batch["index_B"]], np.int64)
