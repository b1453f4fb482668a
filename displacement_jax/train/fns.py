"""The jitted, mesh-sharded functions of one training run (`make_fns`): log-probs, monitor, init and train step."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import ml_collections
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from displacement_jax import forward, runtime, sharding
from displacement_jax.train import monitor as evaluation
from displacement_jax.train import lora as lora_train
from displacement_jax.train import optim as optim_lib
from displacement_jax.train import step as step_lib


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
      lambda p: step_lib.init_state(p, optimizer, config.seed),
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


def optax_state_shardings(optimizer: Any, params: Any, param_sh: Any, replicated: NamedSharding) -> Any:
  """Shardings of the optimizer state: param-shaped leaves follow their param, the rest is replicated."""
  abstract = jax.eval_shape(optimizer.init, params)
  return optax.tree_map_params(
      optimizer, lambda _, sh: sh, abstract, param_sh, transform_non_params=lambda _: replicated
  )
