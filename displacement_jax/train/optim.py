"""Optimizers for preference training: torch-default RMSprop, AdamW, SGD, schedules, clipping, accumulation.

`make_optimizer(optim_config, num_steps)` builds an optax chain; `accumulate_gradients` averages
gradients over micro-batches with a `lax.scan` inside the jitted train step (no optax.MultiSteps, so
one optimizer step == one train step and resume/step counters stay simple).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("rmsprop", "adamw", "sgd")
SCHEDULES = ("constant", "linear", "cosine")
GUARDS = ("state", "gradients")  # the train step's NaN/inf guard (step.make_train_step; config.optim.guard)


def make_schedule(name: str, lr: float, num_steps: int, warmup_steps: int = 0) -> optax.Schedule:
  """Learning-rate schedule: 'constant', 'linear' (warmup then decay to 0) or 'cosine' (warmup then cosine)."""
  if name not in SCHEDULES:
    raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {name!r}")
  if warmup_steps < 0:
    raise ValueError(f"optim.warmup_steps must be >= 0, got {warmup_steps}")
  if name == "constant":
    if warmup_steps == 0:
      return optax.constant_schedule(lr)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup_steps), optax.constant_schedule(lr)], [warmup_steps]
    )
  decay_steps = max(int(num_steps) - warmup_steps, 1)
  if name == "linear":
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, lr, max(warmup_steps, 1)) if warmup_steps else optax.constant_schedule(lr),
            optax.linear_schedule(lr, 0.0, decay_steps),
        ],
        [warmup_steps],
    )
  return optax.warmup_cosine_decay_schedule(0.0 if warmup_steps else lr, lr, warmup_steps, warmup_steps + decay_steps)


def torch_rmsprop(
    learning_rate: float | optax.Schedule, decay: float = 0.99, eps: float = 1e-8, momentum: float = 0.0
) -> optax.GradientTransformation:
  """torch.optim.RMSprop defaults: v <- a v + (1-a) g^2; p <- p - lr g / (sqrt(v) + eps)."""
  return optax.rmsprop(
      learning_rate, decay=decay, eps=eps, eps_in_sqrt=False, momentum=momentum or None, initial_scale=0.0
  )


def make_optimizer(optim_config: Any, num_steps: int) -> optax.GradientTransformation:
  """Build the optimizer from a config with fields name, lr, schedule, warmup_steps, clip, ... (configs/base.py)."""
  name = optim_config.name
  if name not in OPTIMIZERS:
    raise ValueError(f"optim.name must be one of {OPTIMIZERS}, got {name!r}")
  lr = float(optim_config.lr)
  if not lr > 0:
    raise ValueError(f"optim.lr must be > 0, got {lr}")
  schedule = make_schedule(
      optim_config.get("schedule", "constant"), lr, num_steps, int(optim_config.get("warmup_steps", 0))
  )
  if name == "rmsprop":
    opt = torch_rmsprop(
        schedule,
        decay=float(optim_config.get("decay", 0.99)),
        eps=float(optim_config.get("eps", 1e-8)),
        momentum=float(optim_config.get("momentum", 0.0)),
    )
  elif name == "adamw":
    opt = optax.adamw(
        schedule,
        b1=float(optim_config.get("b1", 0.9)),
        b2=float(optim_config.get("b2", 0.999)),
        eps=float(optim_config.get("eps", 1e-8)),
        weight_decay=float(optim_config.get("weight_decay", 0.0)),
    )
  else:
    opt = optax.sgd(schedule, momentum=float(optim_config.get("momentum", 0.0)) or None)
  clip = float(optim_config.get("clip", 0.0) or 0.0)
  if clip < 0:
    raise ValueError(f"optim.clip must be >= 0, got {clip}")
  if clip > 0:
    opt = optax.chain(optax.clip_by_global_norm(clip), opt)
  return opt


def split_micro_batches(batch: dict[str, Any], grad_accum: int) -> dict[str, Any]:
  """Reshape every [B, ...] array to [grad_accum, B // grad_accum, ...]; micro-batch i = rows i, i+A, i+2A, ...

  The strided split keeps each micro-batch spread over all data-parallel devices (rows of one device
  stay on it), so accumulation needs no cross-device reshuffle.
  """
  if grad_accum < 1:
    raise ValueError(f"optim.grad_accum must be >= 1, got {grad_accum}")

  def split(name, x):
    if x.shape[0] % grad_accum:
      raise ValueError(
          f"batch field {name!r} with shape {x.shape} does not split into "
          f"grad_accum={grad_accum} equal micro-batches"
      )
    x = x.reshape((x.shape[0] // grad_accum, grad_accum) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)

  return {k: split(k, v) for k, v in batch.items()}


def accumulate_gradients(
    loss_and_aux_fn: Callable[[Any, dict[str, Any]], tuple[jax.Array, dict[str, jax.Array]]],
    params: Any,
    batch: dict[str, Any],
    grad_accum: int,
) -> tuple[jax.Array, dict[str, jax.Array], Any]:
  """Mean loss, mean aux metrics and mean gradient over `grad_accum` micro-batches (lax.scan).

  `loss_and_aux_fn(params, micro_batch) -> (scalar loss, dict of scalar metrics)`. With grad_accum == 1
  this is a plain value_and_grad. Gradients are accumulated in float32 and averaged, so the result
  equals the full-batch gradient of a mean-reduced loss over equal micro-batches.
  """
  grad_fn = jax.value_and_grad(loss_and_aux_fn, has_aux=True)
  if grad_accum == 1:
    (loss, aux), grads = grad_fn(params, batch)
    return loss, aux, grads
  micro = split_micro_batches(batch, grad_accum)

  def body(carry, micro_batch):
    loss_sum, aux_sum, grad_sum = carry
    (loss, aux), grads = grad_fn(params, micro_batch)
    grad_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads)
    aux_sum = jax.tree.map(lambda a, x: a + x.astype(jnp.float32), aux_sum, aux)
    return (loss_sum + loss.astype(jnp.float32), aux_sum, grad_sum), None

  first = jax.tree.map(lambda x: x[0], micro)
  aux_shape = jax.eval_shape(lambda p, b: loss_and_aux_fn(p, b)[1], params, first)
  init = (
      jnp.zeros((), jnp.float32),
      jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), aux_shape),
      jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
  )
  (loss_sum, aux_sum, grad_sum), _ = jax.lax.scan(body, init, micro)
  scale = 1.0 / grad_accum
  grads = jax.tree.map(lambda g, p: (g * scale).astype(p.dtype), grad_sum, params)
  aux = jax.tree.map(lambda a: a * scale, aux_sum)
  return loss_sum * scale, aux, grads
