"""The displacement monitor run during training: the fixed monitor subset through the step's jitted functions.

`Monitor(...)(params, step)` returns the `monitor/*` metrics of `displacement_jax.monitor` (log-prob changes
against the monitor's own baseline, Definition-1 share, single-token gainers beside Theorem 2, unembedding
metrics). Its baseline log-probs come from the reference pass (`reference.compute_or_load`), which runs the
very same jitted function on the very same batch before training, so step 0 shows exactly zero change.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np

from displacement_jax import monitor as monitor_lib
from displacement_jax import runtime, sharding
from displacement_jax.data.layout import fill_rows, round_up


def monitor_batch(
    dataset: runtime.Dataset, rows: np.ndarray, config: ml_collections.ConfigDict, dp: int, ref: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
  """The fixed monitor subset with its reference log-probs, padded (by repeating its last row) to a multiple
  of the data-parallel size."""
  padded = fill_rows(rows, round_up(len(rows), dp))
  return add_reference(runtime.collate([dataset.pairs[i] for i in padded], dataset.pad_id, config), padded, ref)


def add_reference(batch: dict[str, np.ndarray], rows: np.ndarray, ref: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Attach reference log-probs of `rows` (positions in dataset.pairs) to a collated batch."""
  return dict(
      batch, chosen_ref_logps_B=ref["chosen_ref_logps"][rows], rejected_ref_logps_B=ref["rejected_ref_logps"][rows]
  )


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
  ):
    self.fns, self.rows, self.ref, self.n = fns, rows, ref, len(rows)
    self.top_k = int(config.eval.top_k)
    self.batch_np = monitor_batch(dataset, rows, config, sharding.data_parallel_size(mesh), ref)
    self.batch = sharding.global_batch_to_devices(self.batch_np, mesh)
    self.token_names = None
    if fns.next_token is not None:
      vocab = loaded.model_config.vocab_size
      names = loaded.tokenizer.convert_ids_to_tokens(list(range(vocab))[: len(loaded.tokenizer)])
      self.token_names = names + [f"<unused_{i}>" for i in range(len(names), vocab)]

  def __call__(self, params: Any, step: int) -> dict[str, Any]:
    """Log-prob changes, Definition-1 share and (single-token mode) gainers at `step`."""
    n, batch = self.n, self.batch
    logps = jax.device_get(self.fns.logps(params, batch))
    loss, _ = jax.device_get(self.fns.loss(params, batch))
    out: dict[str, Any] = {"monitor/loss": float(loss)}
    out.update(
        monitor_lib.logprob_change_stats(
            logps["chosen_logps_B"][:n],
            logps["rejected_logps_B"][:n],
            self.ref["monitor_chosen_ref_logps"],
            self.ref["monitor_rejected_ref_logps"],
        )
    )
    if self.fns.next_token is not None:
      out.update(self._single_token(params, step))
    return out

  def _single_token(self, params: Any, step: int) -> dict[str, Any]:
    n, batch_np = self.n, self.batch_np
    nt = jax.device_get(self.fns.next_token(params, self.batch))
    pos = np.argmax(batch_np["chosen_loss_mask_BT"][:n], axis=-1)
    y_pos = batch_np["chosen_labels_BT"][np.arange(n), pos]
    y_neg = batch_np["rejected_labels_BT"][np.arange(n), pos]
    W_VD = np.asarray(jax.device_get(self.fns.unembed(params)), np.float32).T
    k = min(self.top_k, W_VD.shape[0] - 2)
    predicted = monitor_lib.predicted_gainers(W_VD, nt["h_BD"][:n], y_pos, y_neg, nt["prob_BV"][:n], k)
    report = monitor_lib.single_token_report(
        nt["prob_BV"][:n], self.ref["monitor_ref_prob_V"], predicted, y_pos, y_neg, k, self.token_names
    )
    if step == 0:  # nothing trained yet: measured gains are rounding noise; keep only the theory's prediction
      report = {key: v for key, v in report.items() if "predicted" in key}
    out = dict(report)
    out.update(monitor_lib.unembedding_metrics(W_VD, int(y_pos[0]), int(y_neg[0])))
    out["monitor/preferred_prob"] = float(np.mean(nt["prob_BV"][np.arange(n), y_pos]))
    return out


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
