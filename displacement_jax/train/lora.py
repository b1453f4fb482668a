"""LoRA preference training (config.model.lora): only the adapters train, the base weights stay as loaded.

`make_fns` gives the run's jitted functions with the same signatures as full fine-tuning's (`training.make_fns`),
but the params they take are the adapter tree (the train state's params: adapters + their optimizer state, all
fp32, replicated) or the base tree itself: the base tree alone is the base model, the reference policy, so the
reference pass runs on it with no second copy of the weights. The base params (any dtype, sharded as for full
fine-tuning) are arguments of every jitted function, never part of the state, the checkpoints or the gradients.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec as P

from displacement_jax import forward, runtime, sharding
from displacement_jax.train import monitor as evaluation
from displacement_jax.train import optim as optim_lib
from displacement_jax.train import step as step_lib
from displacement_jax.errors import UsageError
from displacement_jax.models import lora, peft_io
from displacement_jax.models.transformer import Transformer


@dataclasses.dataclass
class Adapters:
  """What a LoRA run keeps beside `runtime.Loaded`: the base params (on device), the initial adapters, settings."""

  base: Any
  initial: Any
  rank: int
  targets: tuple[str, ...]
  merge: bool

  def fresh(self, base: Any, seed: int) -> Any:
    """New adapters of this rank and these modules for the base params `base` (arrays or ShapeDtypeStructs): PEFT's
    init, A drawn with `seed`, B zeros, so base + them is the base model exactly; a run with config.seed = `seed`
    starts from these."""
    init = lambda: lora.init_adapters(base, self.rank, self.targets, jax.random.key(int(seed)))
    abstract = any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(base))
    return jax.eval_shape(init) if abstract else init()  # a memory plan's abstract base: abstract adapters


def enabled(config: ml_collections.ConfigDict) -> bool:
  """config.model.lora asks for LoRA (rank > 0, or an adapter directory to start from)."""
  lc = config.model.get("lora")
  return lc is not None and (int(lc.get("rank", 0) or 0) > 0 or bool(lc.get("path")))


def check(config: ml_collections.ConfigDict) -> None:
  """UsageError naming the field for LoRA settings that cannot run."""
  lc = config.model.lora
  rank = lc.get("rank", 0)
  if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
    raise UsageError(f"config.model.lora.rank must be an integer >= 0, got {rank!r}")
  if not float(lc.get("alpha", 16.0)) > 0:
    raise UsageError(f"config.model.lora.alpha must be > 0, got {lc.get('alpha')!r}")
  if not 0.0 <= float(lc.get("dropout", 0.0)) < 1.0:
    raise UsageError(f"config.model.lora.dropout must lie in [0, 1), got {lc.get('dropout')!r}")
  try:
    lora.target_modules(lc.get("target_modules", "all-linear"))
  except ValueError as e:
    raise UsageError(f"config.model.lora.target_modules: {e}") from e


def attach(loaded: runtime.Loaded, config: ml_collections.ConfigDict) -> Adapters:
  """Make `loaded` a LoRA run: `loaded.params` the base params alone, its model one that applies adapters (alpha,
  rsLoRA of the config, or of model.lora.path which runtime.load_model applied), and `loaded.lora` the base
  params and the initial fp32 adapters (PEFT's init, or the directory's). A `loaded` attached already (one model
  for many runs: experiments.short_runs.Session) is returned as it is."""
  if loaded.lora is not None:
    return loaded.lora
  check(config)
  lc = config.model.lora
  base, initial = lora.split(loaded.params)
  model_config = loaded.model_config
  if initial:  # runtime.load_model applied model.lora.path
    initial = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), initial)
    rank = int(peft_io.read_adapter_config(lc.path)["r"])
    targets = tuple(path[-1] for path in lora.adapter_nodes(initial))
  else:
    model_config = lora.with_lora(loaded.model_config, float(lc.alpha), 0.0, bool(lc.get("rslora", False)))
    rank, targets = int(lc.rank), lora.target_modules(lc.get("target_modules", "all-linear"))
  model_config = model_config.replace(lora_dropout=float(lc.get("dropout", 0.0)))  # the config's, as TRL takes it
  loaded.model_config, loaded.model = model_config, Transformer(model_config)
  loaded.params = base
  loaded.lora = Adapters(base, initial, rank, targets, bool(lc.get("merge", False)))
  if not initial:
    loaded.lora.initial = loaded.lora.fresh(base, int(config.seed))
  return loaded.lora


def is_base(params: Any) -> bool:
  """True for a base param tree (the reference model), False for an adapter tree."""
  return "embed_tokens" in params


def make_fns(
    loaded: runtime.Loaded, config: ml_collections.ConfigDict, mesh: Any, total_steps: int
) -> dict[str, Callable | Any]:
  """The fields of `training.Fns` for a LoRA run (see the module docstring); `attach`es the adapters first."""
  ad = attach(loaded, config)
  model, chunk = loaded.model, int(config.logprob_chunk_size)
  base_sh = sharding.param_shardings(loaded.params, mesh)
  loaded.params = ad.base = jax.device_put(loaded.params, base_sh)
  replicated = NamedSharding(mesh, P())
  batch_sh = sharding.batch_sharding(mesh)
  step_jit, init_jit = jit_train_step(model, config, mesh, total_steps, base_sh, ad.initial)

  def dual(fn: Callable) -> Callable:
    """fn(params, batch) jitted for the base tree and for the adapter tree (combined with the base)."""
    on_base = jax.jit(fn, in_shardings=(base_sh, batch_sh), out_shardings=replicated)
    with_adapters = jax.jit(
        lambda base, adapters, b: fn(lora.combine(base, adapters), b),
        in_shardings=(base_sh, replicated, batch_sh),
        out_shardings=replicated,
    )
    return lambda p, b: on_base(p, b) if is_base(p) else with_adapters(ad.base, p, b)

  unembed = jax.jit(lambda p: forward.unembed(model, p), in_shardings=(base_sh,), out_shardings=replicated)
  return dict(
      logps=dual(lambda p, b: forward.pair_logps(model, p, b, chunk)),
      next_token=dual(lambda p, b: forward.next_token_outputs(model, p, b)) if config.data.single_token else None,
      unembed=lambda p: unembed(p if is_base(p) else ad.base),  # adapters never touch the embeddings
      monitor=dual(evaluation.make_monitor_fn(model, config.loss, chunk)),
      init_state=lambda _params: init_jit(ad.initial),
      train_step=lambda state, batch: step_jit(state, batch, ad.base),
      param_sh=base_sh,
      batch_sh=batch_sh,
  )


def jit_train_step(
    model: Transformer, config: ml_collections.ConfigDict, mesh: Any, total_steps: int, base_sh: Any, adapters: Any
) -> tuple[Callable, Callable]:
  """(train_step(state, batch, base), init_state(adapters)) of a LoRA run, jitted: the state (adapters and their
  optimizer state) replicated and donated, the base params sharded by `base_sh` and never updated. `adapters`
  (arrays or ShapeDtypeStructs) give only the state's shapes."""
  chunk = int(config.logprob_chunk_size)
  replicated = NamedSharding(mesh, P())
  optimizer = optim_lib.make_optimizer(config.optim, total_steps)
  state_sh = jax.tree.map(
      lambda _: replicated, jax.eval_shape(lambda a: step_lib.init_state(a, optimizer, config.seed), adapters)
  )
  train_step = adapter_train_step(
      model,
      lambda m: step_lib.make_loss_fn(m, config.loss, chunk),
      optimizer,
      int(config.optim.grad_accum),
      config.optim.get("guard", "state"),
  )
  step_jit = jax.jit(
      train_step,
      in_shardings=(state_sh, sharding.batch_sharding(mesh), base_sh),
      out_shardings=(state_sh, replicated),
      donate_argnums=0,
  )
  init_jit = jax.jit(lambda a: step_lib.init_state(a, optimizer, config.seed), out_shardings=state_sh)
  return step_jit, init_jit


def adapter_train_step(
    model: Transformer, make_loss: Callable[[Any], Callable], optimizer: Any, grad_accum: int, guard: str
) -> Callable:
  """train_step(state, batch, base) of `step.make_train_step` on the adapters (state.params) with the loss
  `make_loss(model)` of the base params combined with them. With the model's lora_dropout the adapters drop their
  inputs (train mode), a key per step (the state's rng) and micro-batch (its first row's index_B)."""

  def train_step(state: step_lib.TrainState, batch: dict[str, Any], base: Any):
    def loss_fn(adapters, b):
      if not model.config.lora_dropout:
        return make_loss(model)(lora.combine(base, adapters), b)
      key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), b["index_B"][0])
      return make_loss(lora.WithDropout(model, key))(lora.combine(base, adapters), b)

    return step_lib.make_train_step(loss_fn, optimizer, grad_accum, guard)(state, batch)

  return train_step


def save(params: Any, loaded: runtime.Loaded, out_dir: str, *, progress: bool = True) -> None:
  """Write the trained adapters (host tree) as a PEFT adapter directory into `out_dir` and, with
  model.lora.merge, the merged HF checkpoint into `out_dir`/merged (process 0 writes)."""
  if jax.process_index() == 0:
    peft_io.save_adapter(params, loaded.model_config, out_dir, base_model_name_or_path=loaded.identity.get("path"))
  if loaded.lora.merge:
    peft_io.save_merged(
        loaded.lora.base, params, loaded.model_config, os.path.join(out_dir, "merged"), progress=progress
    )
