"""Mean loss and gradient over micro-batches: gradient accumulation as a `lax.scan` inside a jitted step.

No optax.MultiSteps: one optimizer step is one train step, so resume and step counters stay simple. Used by the
train step (train/step.py) and the displacement audit's replay (audit/replay.py, audit/decompose.py), which must
see the gradients training sees.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp


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
