"""The displacement monitor run during training: the fixed monitor subset through one jitted forward pass.

`Monitor(...)(params, step)` returns the `monitor/*` metrics of `displacement_jax.displacement` (log-prob changes
against the monitor's own baseline, Definition-1 share, single-token gainers beside Theorem 2, unembedding
metrics). One evaluation costs one forward pass over the monitor rows: `make_monitor_fn` gives the log-probs and
the loss from the same forward, on shared-prompt packed rows of one fixed shape (compiled once per run). Its
baseline log-probs come from the reference pass (`reference.compute_or_load`), which runs the very same jitted
function on the very same batch before training, so step 0 shows exactly zero change.

With `eval.audit` the run is first audited for the monitored pairs (`audit_predictions`: the displacement audit's
replay route, docs/theory.md), and every evaluation logs its prediction beside the measured change per pair
(`monitor.audit_agreement`).
"""

from __future__ import annotations

from typing import Any, Iterable

import jax
import ml_collections
import numpy as np

from displacement_jax import forward
from displacement_jax import displacement as monitor_lib
from displacement_jax import runtime, sharding
from displacement_jax.audit import replay as audit
from displacement_jax.train import optim as optim_lib
from displacement_jax.train import step as step_lib
from displacement_jax.data.layout import fill_rows, round_up


def make_monitor_fn(model: Any, loss_config: Any, chunk_size: int) -> Any:
  """monitor_fn(params, batch) -> {'chosen_logps_B', 'rejected_logps_B', 'loss'}: log-probs and the configured
  loss from ONE forward pass (either batch layout; the batch carries the reference log-probs)."""

  def monitor_fn(params, batch):
    logps = forward.pair_logps(model, params, batch, chunk_size)
    pc, pr = logps["chosen_logps_B"], logps["rejected_logps_B"]
    loss, _ = step_lib.preference_loss(loss_config, pc, pr, batch["chosen_ref_logps_B"], batch["rejected_ref_logps_B"])
    return {"chosen_logps_B": pc, "rejected_logps_B": pr, "loss": loss}

  return monitor_fn


def monitor_batch(
    dataset: runtime.Dataset, rows: np.ndarray, config: ml_collections.ConfigDict, dp: int, ref: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
  """The fixed monitor subset with its reference log-probs, padded (by repeating its last row) to a multiple
  of the data-parallel size: the two-side collated batch (single-token mode reads the next-token distribution
  from it) and the layout the log-probs run on (`packed_monitor_batch`)."""
  padded = fill_rows(rows, round_up(len(rows), dp))
  return add_reference(runtime.collate([dataset.pairs[i] for i in padded], dataset.pad_id, config), padded, ref)


def packed_monitor_batch(
    batch: dict[str, np.ndarray], dataset: runtime.Dataset, config: ml_collections.ConfigDict, dp: int
) -> dict[str, np.ndarray]:
  """The monitor batch in the training layout (packed rows of up to data.pairs_per_row pairs when packing is on,
  planned over the `dp` data-parallel devices), one fixed shape."""
  return runtime.pack_for_logps(batch, dataset.pad_id, config, groups=dp)


def add_reference(batch: dict[str, np.ndarray], rows: np.ndarray, ref: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Attach reference log-probs of `rows` (positions in dataset.pairs) to a collated batch."""
  return dict(
      batch, chosen_ref_logps_B=ref["chosen_ref_logps"][rows], rejected_ref_logps_B=ref["rejected_ref_logps"][rows]
  )


def token_names(tokenizer: Any, vocab_size: int) -> list[str]:
  """The tokenizer's string of every id below `vocab_size` ('<unused_i>' for the embedding rows past its vocab)."""
  names = tokenizer.convert_ids_to_tokens(list(range(vocab_size))[: len(tokenizer)])
  return names + [f"<unused_{i}>" for i in range(len(names), vocab_size)]


def replayed_direction(
    model: Any,
    config: ml_collections.ConfigDict,
    params0: Any,
    batches: Iterable[Any],
    total_steps: int,
    base: Any = None,
) -> Any:
  """D of the run `config` describes: its `batches` (all `total_steps`, with reference log-probs) replayed at
  `params0` through its optimizer and loss (`audit.make_replay_step`), the updates summed (`audit.replay_direction`).
  With `base` (LoRA) params0 and D are the adapters, the base fixed."""
  optimizer = optim_lib.make_optimizer(config.optim, total_steps)
  loss_fn = step_lib.make_loss_fn(model, config.loss, int(config.logprob_chunk_size))
  replay = jax.jit(audit.make_replay_step(loss_fn, optimizer, int(config.optim.grad_accum)))
  return audit.replay_direction(replay, optimizer, params0, batches, base)


def audit_predictions(
    fns: Any,
    loaded: runtime.Loaded,
    dataset: runtime.Dataset,
    rows: np.ndarray,
    ref: dict[str, np.ndarray],
    config: ml_collections.ConfigDict,
    mesh: Any,
    total_steps: int,
    batches: Iterable[Any],
) -> dict[str, np.ndarray]:
  """The displacement audit of this run for the monitored `rows`: the run's `batches` (all `total_steps`, with
  reference log-probs) replayed at the initial params `loaded.params` through its optimizer and summed into D
  (`replayed_direction`); per pair the predicted change of ln pi(y+) over the run, {'first_order':
  <grad ln pi(y+), D>, 'along_direction': the model at theta0 + D} [len(rows)], in chunks of audit.JVP_PAIRS.
  LoRA (`loaded.lora`): theta0 and D are the initial adapters and their summed updates, on the fixed base."""
  base, params0 = (None, loaded.params) if loaded.lora is None else (loaded.lora.base, loaded.lora.initial)
  direction = replayed_direction(loaded.model, config, params0, batches, total_steps, base)
  shifted = audit.shifted(params0, direction, 1.0)
  if base is None:  # LoRA: fns.monitor places the (replicated) adapters itself
    shifted = jax.device_put(shifted, fns.param_sh)
  derivatives = audit.make_directional_derivatives(loaded.model, 1)
  dp, first, along = sharding.data_parallel_size(mesh), [], []
  for start in range(0, len(rows), audit.JVP_PAIRS):
    part = np.asarray(rows[start : start + audit.JVP_PAIRS])
    batch = packed_monitor_batch(monitor_batch(dataset, part, config, dp, ref), dataset, config, dp)
    batch = sharding.global_batch_to_devices(batch, mesh)
    first.append(np.asarray(jax.device_get(derivatives(params0, direction, batch, base)))[0, 0, : len(part)])
    at_d, at_0 = (
        np.asarray(jax.device_get(fns.monitor(p, batch))["chosen_logps_B"], np.float64) for p in (shifted, params0)
    )
    along.append((at_d - at_0)[: len(part)])  # both on this batch's layout: no rounding between layouts
  return {"first_order": np.concatenate(first).astype(np.float64), "along_direction": np.concatenate(along)}


class Monitor:
  """Displacement monitor on the fixed subset `rows` of the training pairs (see the module docstring)."""

  def __init__(
      self,
      fns: Any,
      loaded: runtime.Loaded,
      dataset: runtime.Dataset,
      rows: np.ndarray,
      ref: dict[str, np.ndarray],
      config: ml_collections.ConfigDict,
      mesh: Any,
      predicted: dict[str, np.ndarray] | None = None,
  ):
    """`predicted`: the audit's predictions for `rows` (`audit_predictions`), logged beside the measured change."""
    self.fns, self.rows, self.ref, self.n, self.predicted = fns, rows, ref, len(rows), predicted
    self.top_k, self.show_fell = int(config.eval.top_k), int(config.eval.get("show_fell", 5))
    self.row_index = [int(dataset.pairs[i].index) for i in rows]  # the monitored pairs' 0-based rows in the data
    dp = sharding.data_parallel_size(mesh)
    self.batch_np = monitor_batch(dataset, rows, config, dp, ref)
    self.batch = sharding.global_batch_to_devices(packed_monitor_batch(self.batch_np, dataset, config, dp), mesh)
    self.two_side = sharding.global_batch_to_devices(self.batch_np, mesh) if fns.next_token is not None else None
    self.token_names = None
    if fns.next_token is not None:
      self.token_names = token_names(loaded.tokenizer, loaded.model_config.vocab_size)

  def __call__(self, params: Any, step: int) -> dict[str, Any]:
    """Log-prob changes, Definition-1 share and (single-token mode) gainers at `step`."""
    n, batch = self.n, self.batch
    logps = jax.device_get(self.fns.monitor(params, batch))
    out: dict[str, Any] = {"monitor/loss": float(logps["loss"])}
    out.update(
        monitor_lib.logprob_change_stats(
            logps["chosen_logps_B"][:n],
            logps["rejected_logps_B"][:n],
            self.ref["monitor_chosen_ref_logps"],
            self.ref["monitor_rejected_ref_logps"],
        )
    )
    out.update(
        monitor_lib.fallen_pairs(
            logps["chosen_logps_B"][:n] - self.ref["monitor_chosen_ref_logps"],
            self.ref["monitor_chosen_ref_logps"],
            self.row_index,
            self.show_fell,
        )
    )
    if self.predicted is not None:
      change = logps["chosen_logps_B"][:n] - self.ref["monitor_chosen_ref_logps"]
      out.update(monitor_lib.audit_agreement(self.predicted, change, self.row_index))
    if self.fns.next_token is not None:
      out.update(self._single_token(params, step))
    return out

  def _single_token(self, params: Any, step: int) -> dict[str, Any]:
    n, batch_np = self.n, self.batch_np
    nt = jax.device_get(self.fns.next_token(params, self.two_side))
    pos = np.argmax(batch_np["chosen_loss_mask_BT"][:n], axis=-1)
    y_pos = batch_np["chosen_labels_BT"][np.arange(n), pos]
    y_neg = batch_np["rejected_labels_BT"][np.arange(n), pos]
    W_VD = np.asarray(jax.device_get(self.fns.unembed(params)), np.float32).T
    return monitor_lib.single_token_row(
        W_VD,
        nt["h_BD"][:n],
        nt["prob_BV"][:n],
        self.ref["monitor_ref_prob_V"],
        y_pos,
        y_neg,
        self.top_k,
        step,
        self.token_names,
    )


def warning_after(
    step: int, metrics: dict[str, Any], prev: dict[str, Any], config: ml_collections.ConfigDict
) -> str | None:
  """The displacement warning line for this evaluation (monitor.displacement_warning with eval.warning_nats)."""
  return monitor_lib.displacement_warning(
      step,
      metrics["monitor/loss"],
      metrics["monitor/preferred_logprob_change"],
      prev.get("loss"),
      prev.get("preferred"),
      nats=float(config.eval.get("warning_nats", monitor_lib.WARNING_NATS)),
  )


def more_warnings(
    step: int, metrics: dict[str, Any], prev: dict[str, Any], config: ml_collections.ConfigDict
) -> list[str]:
  """The share and peak warnings of this evaluation (monitor.share_and_peak_warnings with eval.warning_share and
  eval.warning_drop_nats; `prev` holds the previous eval's 'share' and the earlier evals' 'peak')."""
  return monitor_lib.share_and_peak_warnings(
      step,
      metrics["monitor/share_preferred_fell"],
      metrics["monitor/preferred_logprob_change"],
      prev.get("share"),
      prev.get("peak"),
      share_threshold=float(config.eval.get("warning_share", monitor_lib.WARNING_SHARE)),
      drop_nats=float(config.eval.get("warning_drop_nats", monitor_lib.WARNING_DROP_NATS)),
  )
