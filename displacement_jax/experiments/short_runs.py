"""Many short preference-training runs on one loaded model, each measured per pair after every epoch.

A search over settings (objective, optimizer, learning rate, epochs, data kind) or a demo that trains the same
pairs several ways loads the model once and reuses it: `Session` holds the model, its initial params and the
mesh; `Session.dataset` tokenizes rows exactly as `train.loop.run` does (`runtime.load_data`), and `Session.train`
runs `train.fns.make_fns`'s train step on `train.loop.make_iterator`'s batches (the batches and step of `train.loop.run`,
without checkpoints or the monitor), returning ln pi(y+) and ln pi(y-) of every pair before training and after
each epoch.

LoRA (config.model.lora, `train.lora.attach`): the session's params are the adapters (fp32, drawn once with the
session's config.seed, or model.lora.path's), on the fixed base params `Session.base`; every run trains them alone,
as `train.loop.run` does (its reference the base model: `reference`), and the audit (`direction`, `derivatives`,
`audit`, `audit_decomposed`) differentiates w.r.t. them alone (`models.lora.full_params`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from displacement_jax import forward, runtime, sharding
from displacement_jax.audit import decompose, sketch
from displacement_jax.config import checks as config_checks
from displacement_jax.errors import UsageError
from displacement_jax.models import lora
from displacement_jax.score import core as scoring
from displacement_jax.train import fns as fns_lib
from displacement_jax.train import lora as lora_train
from displacement_jax.train import loop as training
from displacement_jax.train import monitor as evaluation
from displacement_jax.audit import replay as audit
from displacement_jax.train import optim as optim_lib
from displacement_jax.train import step as step_lib
from displacement_jax.data import batching, packing, schema
from displacement_jax.data.layout import round_up
from displacement_jax.experiments import common

EVAL_BATCH = 64  # at most this many pairs per forward when measuring log-probs (packed rows, one compile)


@dataclasses.dataclass
class Measured:
  """ln pi(y+) / ln pi(y-) of every pair [N] at the start, and after each epoch [E, N]."""

  chosen_N: np.ndarray
  rejected_N: np.ndarray
  chosen_EN: np.ndarray
  rejected_EN: np.ndarray
  params: Any = None  # the trained params (LoRA: the adapters; kept only when asked)

  def chosen_change(self, epoch: int = -1) -> np.ndarray:
    """Change of ln pi(y+) per pair after `epoch` (1-based; -1 = the last)."""
    return self.chosen_EN[epoch if epoch < 0 else epoch - 1] - self.chosen_N

  def rejected_change(self, epoch: int = -1) -> np.ndarray:
    return self.rejected_EN[epoch if epoch < 0 else epoch - 1] - self.rejected_N


def summary(chosen_change_N: np.ndarray, rejected_change_N: np.ndarray) -> dict[str, float]:
  """The search's columns: mean change of ln pi(y+) and ln pi(y-), share of pairs whose ln pi(y+) fell, the
  largest fall, and the mean change of the margin ln pi(y+) - ln pi(y-)."""
  return {
      "chosen_change_mean": float(np.mean(chosen_change_N)),
      "share_chosen_fell": float(np.mean(chosen_change_N < 0)),
      "chosen_change_min": float(np.min(chosen_change_N)),
      "rejected_change_mean": float(np.mean(rejected_change_N)),
      "margin_change_mean": float(np.mean(chosen_change_N - rejected_change_N)),
  }


def flatten(overrides: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Nested overrides ({'loss': {'sft_coeff': 0.1}}, as a config stores them) -> dotted ({'loss.sft_coeff': 0.1})."""
  out = {}
  for key, value in overrides.items():
    if isinstance(value, Mapping) or isinstance(value, ml_collections.ConfigDict):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def check_auditable(config: ml_collections.ConfigDict) -> None:
  """UsageError where the audit's replay would differ from the run `config` describes: LoRA with adapter dropout
  (the replay takes its gradients without dropout)."""
  if lora_train.enabled(config) and float(config.model.lora.get("dropout", 0.0) or 0.0) > 0:
    raise UsageError(
        "the audit replays LoRA runs without adapter dropout; set --config.model.lora.dropout=0 "
        f"(got {config.model.lora.dropout})"
    )


class Session:
  """One loaded model (`runtime.load_model(config)`) for many short runs; `config` gives the model, data format,
  max_length and the defaults every run's config starts from. `params0`: the trained params at the start (LoRA:
  the initial adapters, `base` the fixed base params; otherwise every param, `base` None)."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.mesh = sharding.mesh_from_config(config.mesh, config.get("distributed"))
    self.loaded = runtime.load_model(config, self.mesh)
    self.lora = lora_train.attach(self.loaded, config) if lora_train.enabled(config) else None
    self.params0 = self.loaded.params if self.lora is None else self.lora.initial
    self._logps: Callable | None = None
    self._derivatives: dict[int, Callable] = {}
    self._reference: tuple[runtime.Dataset, tuple[np.ndarray, np.ndarray]] | None = None

  def dataset(self, rows: Sequence[Mapping[str, Any]], name: str) -> runtime.Dataset:
    """Tokenize `rows` (generic preference rows) as train.loop.run would, written to output_dir/data/<name>.jsonl."""
    path = os.path.join(self.config.output_dir, "data", f"{name}.jsonl")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    schema.write_jsonl(path, list(rows))
    cfg = common.derive(self.config, {"data.path": path, "data.schema": "generic", "data.limit": 0})
    return runtime.load_data(cfg, self.loaded.tokenizer, self.loaded.model_config.vocab_size)

  @property
  def base(self) -> Any:
    """The fixed base params the adapters apply to (LoRA), else None (`models.lora.full_params`)."""
    return None if self.lora is None else self.lora.base

  def logps(self, params: Any, dataset: runtime.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(ln pi(y+) [N], ln pi(y-) [N]) of every pair of `dataset` under the trained params `params` (LoRA: adapters
    on `base`)."""
    if self._logps is None:  # one jitted pass for every params (the same model and chunk size)
      model, chunk = self.loaded.model, int(self.config.logprob_chunk_size)
      self._logps = jax.jit(lambda base, p, b: forward.pair_logps(model, lora.full_params(base, p), b, chunk))
    pairs = dataset.pairs
    rows = min(EVAL_BATCH, round_up(len(pairs), sharding.data_parallel_size(self.mesh)))
    chosen, rejected = [], []
    for start in range(0, len(pairs), rows):
      part = pairs[start : start + rows]
      out = jax.device_get(self._logps(self.base, params, self._collate(part, dataset.pad_id, rows, packed=True)))
      chosen.append(np.asarray(out["chosen_logps_B"])[: len(part)])
      rejected.append(np.asarray(out["rejected_logps_B"])[: len(part)])
    return np.concatenate(chosen), np.concatenate(rejected)

  def reference(self, dataset: runtime.Dataset, start: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The reference log-probs of a run, as train.loop.run takes them: the initial model's (`start`), except for
    LoRA adapters loaded from model.lora.path, where the reference is the base model alone (the base tree,
    `train.lora`); fresh adapters (B = 0) leave the base model unchanged, so there both are `start`."""
    if self.lora is None or not self.config.model.lora.get("path"):
      return start
    if self._reference is None or self._reference[0] is not dataset:
      self._reference = (dataset, self.logps({}, dataset))  # no adapters: the base model
    return self._reference[1]

  def measures(self, dataset: runtime.Dataset) -> dict[str, np.ndarray]:
    """`scoring.MEASURES` [N] of every pair at the initial model ('ches', 'ln_ches',
    'minus_normalized_edit_distance', 'last_hidden_inner_product'; scoring.score_examples on its rows)."""
    examples = list(schema.load_preference_data(dataset.path))
    scores = scoring.score_examples(
        self.loaded.model,
        lora.full_params(self.base, self.params0),
        self.config,
        self.loaded.tokenizer,
        examples,
        batch_size=int(self.config.batch_size),
        progress=False,
    )
    return {m: np.array([s[m] for s in scores]) for m in scoring.MEASURES}

  def _collate(self, pairs: Sequence[Any], pad_id: int, rows: int, *, packed: bool = False) -> dict[str, Any]:
    """`pairs` collated to `rows` rows (filler rows carry no loss mask), in the packed layout of training
    (`runtime.pack_for_logps`, lengths bucketed) when `packed`, placed on the mesh."""
    batch = self._host_collate(pairs, pad_id, rows)
    if packed:
      batch = runtime.pack_for_logps(batch, pad_id, self.config, groups=sharding.data_parallel_size(self.mesh))
    return sharding.host_local_batch_to_global(batch, self.mesh)

  def derivatives(self, direction: Any, dataset: runtime.Dataset, order: int = 1) -> np.ndarray:
    """[order, 2, N]: the first (and second) derivative of ln pi(y+-) along `direction` (params0-shaped: LoRA, the
    adapters) at the initial params for every pair (`audit.make_directional_derivatives`)."""
    if order not in self._derivatives:
      self._derivatives[order] = audit.make_directional_derivatives(self.loaded.model, order)
    out, pairs = [], dataset.pairs
    for start in range(0, len(pairs), audit.JVP_PAIRS):
      part = pairs[start : start + audit.JVP_PAIRS]
      batch = self._collate(part, dataset.pad_id, audit.JVP_PAIRS, packed=True)
      derivs = self._derivatives[order](self.params0, direction, batch, self.base)
      out.append(np.asarray(jax.device_get(derivs))[:, :, : len(part)])
    return np.concatenate(out, axis=2)

  def direction(
      self,
      dataset: runtime.Dataset,
      overrides: Mapping[str, Any],
      *,
      start: tuple[np.ndarray, np.ndarray] | None = None,
  ) -> Any:
    """D of the run `train(dataset, overrides)` would make: its batches replayed at the initial params through its
    optimizer, the updates summed (`evaluation.replayed_direction`; LoRA: over the adapters). `start`: as in
    `train`."""
    cfg = self.audit_config({"data.path": dataset.path, **overrides})
    chosen0, rejected0 = start if start is not None else self.logps(self.params0, dataset)
    total, batches = self._replay_batches(dataset, cfg, (chosen0, rejected0))
    return evaluation.replayed_direction(
        self.loaded.model, cfg, self.params0, (b for _, b in batches), total, self.base
    )

  def audit(
      self,
      dataset: runtime.Dataset,
      overrides: Mapping[str, Any],
      *,
      start: tuple[np.ndarray, np.ndarray] | None = None,
      order: int = 1,
  ) -> dict[str, np.ndarray]:
    """The displacement audit of the run `train(dataset, overrides)` would make (`audit`'s replay route):
    predictions [2, N] per pair (chosen, rejected) of the change after all its epochs: {'first_order',
    'along_direction', 'curvature'} and, with order 2, 'second_order'. `start`: as in `train`."""
    chosen0, rejected0 = start if start is not None else self.logps(self.params0, dataset)
    return audit.predict(
        np.stack((chosen0, rejected0)),
        lambda p: np.stack(self.logps(p, dataset)),
        lambda d: self.derivatives(d, dataset, order),
        self.params0,
        self.direction(dataset, overrides, start=(chosen0, rejected0)),
    )

  def _replay_batches(
      self, dataset: runtime.Dataset, cfg: ml_collections.ConfigDict, start: tuple[np.ndarray, np.ndarray]
  ) -> tuple[int, Iterator[tuple[np.ndarray, dict[str, Any]]]]:
    """(number of steps, the run's batches as (positions in dataset.pairs, global batch with the run's reference
    log-probs, `reference`)), in the order and seed of training."""
    iterator = training.make_iterator(dataset, cfg, self.mesh)
    total = int(cfg.num_epochs) * iterator.steps_per_epoch
    chosen_ref, rejected_ref = self.reference(dataset, start)
    ref = {"chosen_ref_logps": chosen_ref, "rejected_ref_logps": rejected_ref}
    return total, training.reference_batches(iterator, dataset, self.mesh, ref, total)

  def audit_decomposed(
      self,
      dataset: runtime.Dataset,
      overrides: Mapping[str, Any],
      *,
      start: tuple[np.ndarray, np.ndarray] | None = None,
      order: int = 1,
  ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """`audit` plus its decomposition (audit/decompose.py; settings from the config's `audit` section):
    (predictions as `audit` returns them, {'chosen' / 'rejected': [N, N] contributions C_ij of pair j to pair i's
    first order, 'dloss': [2, N], 'subspace_size', 'replay_s', 'pairs_s', 'steps', 'subspace_first_order': [2, N]
    the exact (unprojected) first order along D restricted to the subspace, what own + others estimates}). One
    replay (one backward per batch, recording each step's clip factor and preconditioner on the subspace) gives D;
    then the per-pair gradients at the initial params, projected, of each step's pairs in chunks of
    `audit.pair_chunk` (`_pair_sketches`): as many pair gradients as the run's epochs take."""
    cfg = self.audit_config({"data.path": dataset.path, **overrides})
    s = decompose.settings(cfg)
    chosen0, rejected0 = start if start is not None else self.logps(self.params0, dataset)
    total, batches = self._replay_batches(dataset, cfg, (chosen0, rejected0))
    optimizer = optim_lib.make_optimizer(cfg.optim, total)
    schedule = optim_lib.make_schedule(
        cfg.optim.get("schedule", "constant"), float(cfg.optim.lr), total, int(cfg.optim.get("warmup_steps", 0))
    )
    loss_fn = step_lib.make_loss_fn(self.loaded.model, cfg.loss, int(cfg.logprob_chunk_size))
    record = decompose.make_recording_step(loss_fn, optimizer, cfg.optim, s)
    tic = time.perf_counter()
    opt_state = optimizer.init(self.params0)
    direction = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), self.params0)
    gammas, qs, members = [], [], []
    for t, (where, batch) in enumerate(batches):
      opt_state, direction, gamma, q = record(self.params0, opt_state, direction, batch, jnp.int32(t + 1), self.base)
      gammas.append(float(gamma))
      qs.append(None if q is None else {k: np.asarray(v) for k, v in jax.device_get(q).items()})
      members.append(np.asarray(where, int))
    jax.block_until_ready(direction)
    replay_s = time.perf_counter() - tic
    pred = audit.predict(
        np.stack((chosen0, rejected0)),
        lambda p: np.stack(self.logps(p, dataset)),
        lambda d: self.derivatives(d, dataset, order),
        self.params0,
        direction,
    )
    exact = pred["first_order"]  # what own + others estimates: the first order along D restricted to the subspace
    if s.subspace != "all":
      exact = self.derivatives(sketch.restrict(direction, s.subspace, s.last_layers), dataset, 1)[0]
    del direction, opt_state
    tic = time.perf_counter()
    weights = decompose.step_weights(cfg.optim, [float(schedule(t)) for t in range(total)], qs)
    dloss = decompose.loss_derivatives(cfg.loss, chosen0, rejected0, *self.reference(dataset, (chosen0, rejected0)))
    rows = self._pair_sketches(dataset, s, dloss, members, [g / int(cfg.batch_size) for g in gammas], weights)
    chosen, rejected = decompose.contributions(rows)
    pairs_s = time.perf_counter() - tic
    info = {
        "chosen": chosen,
        "rejected": rejected,
        "dloss": dloss,
        "subspace_size": sketch.size(
            jax.eval_shape(lambda p: sketch.select(p, s.subspace, s.last_layers), self.params0)
        ),
        "settings": s,
        "replay_s": replay_s,
        "pairs_s": pairs_s,
        "steps": total,
        "subspace_first_order": np.asarray(exact, np.float64),
    }
    return pred, info

  def _pair_sketches(
      self,
      dataset: runtime.Dataset,
      s: decompose.Settings,
      dloss_2N: np.ndarray,
      members: Sequence[np.ndarray],
      coefs: Sequence[float],
      weights: Sequence[Any],
  ) -> np.ndarray:
    """[N, 3, k]: per pair S a, S b and S (W_j * g_j) (decompose.make_chunk_sketches; g_j from the loss
    derivatives `dloss_2N`) with W_j = sum over the steps s holding pair j of coefs[s] M_s (`weights[s]`),
    accumulated step by step: step s's pairs (`members[s]`, positions in dataset.pairs) go through in chunks of
    s.pair_chunk rows, one pair per row, every chunk padded to the same rows and lengths (one compile). Pairs in
    no step are projected with W = 0."""
    pairs = dataset.pairs
    fn = decompose.make_chunk_sketches(self.loaded.model, int(self.config.logprob_chunk_size), s)
    rows = round_up(s.pair_chunk, sharding.data_parallel_size(self.mesh))
    packed = runtime.packing_enabled(self.config)
    shape = packing.packed_lengths(self._host_collate(pairs, dataset.pad_id, len(pairs))) if packed else None
    seen = np.zeros(len(pairs), bool)
    for step in range(len(members)):
      seen[members[step]] = True
    visits = list(zip(members, coefs, weights))
    if not seen.all() and weights:  # pairs the run never trains on: pushed, pushing nobody
      visits.append((np.flatnonzero(~seen), 0.0, weights[0]))
    subspace = jax.eval_shape(lambda p: sketch.select(p, s.subspace, s.last_layers), self.params0)
    bits = sketch.count_sketch_bits(subspace, s.sketch_seed) if s.sketch == "count_sketch" else None
    dloss_N2 = np.zeros((len(pairs) + rows, 2), np.float32)  # filler rows: zeros
    dloss_N2[: len(pairs)] = np.asarray(dloss_2N, np.float32).T
    out = None
    for where, coef, weight in visits:
      weight = jax.tree.map(jnp.asarray, weight)
      for start in range(0, len(where), rows):
        part = where[start : start + rows]
        batch = self._collate_rows([pairs[i] for i in part], dataset.pad_id, rows, shape)
        padded = np.concatenate([part, np.full(rows - len(part), len(pairs))])
        got = fn(self.params0, batch, jnp.asarray(dloss_N2[padded]), weight, bits, self.base)
        got = np.asarray(jax.device_get(got), np.float64)[: len(part)]
        if out is None:
          out = np.zeros((len(pairs),) + got.shape[1:])
        out[part, :2] = got[:, :2]
        np.add.at(out, (part, 2), coef * got[:, 2])
    return out

  def _host_collate(self, pairs: Sequence[Any], pad_id: int, rows: int) -> dict[str, np.ndarray]:
    """`pairs` collated (batching.collate) to `rows` rows, filler rows carrying no loss mask, on the host."""
    return batching.collate(
        list(pairs),
        pad_id=pad_id,
        padding_side=self.config.data.get("padding_side", "right"),
        pad_to=int(self.config.data.max_length),
        pad_rows_to=rows,
    )

  def _collate_rows(
      self, pairs: Sequence[Any], pad_id: int, rows: int, shape: tuple[int, int] | None
  ) -> dict[str, Any]:
    """`pairs` collated to `rows` rows, one pair per row (packing.pack_batch to the lengths `shape` when packing
    is on, bucketed like training's rows), placed on the mesh."""
    batch = self._host_collate(pairs, pad_id, rows)
    if shape is not None:
      t, r = (batching.packed_bucket(n) for n in shape)
      batch = packing.pack_batch(batch, pad_to=t, response_pad_to=r, pad_id=pad_id)
    return sharding.host_local_batch_to_global(batch, self.mesh)

  def run_config(self, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """The session's config with `overrides` (dotted paths, `common.derive`, or nested), checked as train.loop.run
    checks it. model.lora is the session's (its model and adapters are set at the start): UsageError if a run
    changes it."""
    cfg = common.derive(self.config, flatten(overrides))
    config_checks.check_train(cfg)
    if cfg.model.get("lora") is not None and cfg.model.lora.to_dict() != self.config.model.lora.to_dict():
      changed = sorted(k for k in flatten(overrides) if k.startswith("model.lora"))
      raise UsageError(f"a short run cannot change the session's model.lora ({', '.join(changed)})")
    return cfg

  def audit_config(self, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """`run_config`, checked by `check_auditable`."""
    cfg = self.run_config(overrides)
    check_auditable(cfg)
    return cfg

  def train(
      self,
      dataset: runtime.Dataset,
      overrides: Mapping[str, Any],
      *,
      start: tuple[np.ndarray, np.ndarray] | None = None,
      keep_params: bool = False,
  ) -> Measured:
    """Train from the initial params on `dataset` with the session's config + `overrides` for its num_epochs
    (the train step and batches of train.loop.run; reference log-probs = the initial model's; LoRA: the adapters
    alone), measuring every pair after each epoch. `start`: the pairs' log-probs at the initial params when already
    measured."""
    cfg = self.run_config({"data.path": dataset.path, **overrides})
    iterator = training.make_iterator(dataset, cfg, self.mesh)
    epochs = int(cfg.num_epochs)
    fns = fns_lib.make_fns(self.loaded, cfg, self.mesh, epochs * iterator.steps_per_epoch)
    chosen0, rejected0 = start if start is not None else self.logps(self.params0, dataset)
    chosen_ref, rejected_ref = self.reference(dataset, (chosen0, rejected0))
    ref = {"chosen_ref_logps": chosen_ref, "rejected_ref_logps": rejected_ref}
    state = fns.init_state(jax.tree.map(jnp.copy, self.params0))  # init_state donates its argument
    chosen_E, rejected_E = [], []
    for _ in range(epochs):
      for _ in range(iterator.steps_per_epoch):
        local = next(iterator)
        batch = evaluation.add_reference(local, training.positions(local, dataset), ref)
        state, metrics = fns.train_step(state, sharding.host_local_batch_to_global(batch, self.mesh))
        if int(jax.device_get(metrics["nonfinite"])):
          raise training.NonFiniteLossError(f"non-finite loss or gradient in a short run with {dict(overrides)}")
      c, r = self.logps(state.params, dataset)
      chosen_E.append(c)
      rejected_E.append(r)
    return Measured(chosen0, rejected0, np.stack(chosen_E), np.stack(rejected_E), state.params if keep_params else None)
