"""Displacement audit, replay route: predict per pair, before training, how a configured run moves ln pi(y+).

The run's batches (the same iterator, seed and order as training) are replayed at the INITIAL parameters:
each batch's loss gradient at theta0 goes through the configured optimizer (RMSprop / AdamW / SGD, its state
building from zero exactly as in training: second moments, bias correction, Adam's first moment) and the
updates are summed, never applied, into one direction D = sum_t delta theta_t. Then for every pair i:

  first order    <grad ln pi(y+_i), D>: a forward-mode derivative (jax.jvp) along D, on the model with its
                 reference attention and a dense log-softmax at the response slots of the packed layout (the
                 fast kernels define custom VJPs, which have no JVP rule), a few pairs at a time;
  along D        f(theta0 + D) - f(theta0): the model evaluated at the summed update (all orders along D);
  curvature      along D minus first order (second and higher orders along D).

f = ln pi(y+_i) (and ln pi(y-_i)). Cost: one backward per batch (as one epoch of training) and one JVP and two
forwards over the pairs. What is approximated: every update is taken at theta0 (the gradients do not move with the
parameters), so the prediction is exact to first order in the learning rate and misses how the gradients
change along the run; docs/results.md measures where that holds. The forward-mode derivative is a finite
JVP runs on the model's reference path because the fast kernels define custom VJPs (no JVP rule).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from displacement_jax import forward
from displacement_jax.train import optim as optim_lib
from displacement_jax.models import transformer

JVP_PAIRS = 8  # pairs per forward-mode pass (its dense [rows, response slots, V] float32 logits are its memory)


def make_replay_step(loss_fn: Callable, optimizer: optax.GradientTransformation, grad_accum: int = 1) -> Callable:
  """replay_step(params0, opt_state, direction, batch) -> (opt_state, direction): the update the optimizer
  would make from this batch's gradient AT params0, added to `direction` (params0 itself never changes)."""

  def replay_step(params0: Any, opt_state: Any, direction: Any, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
    _, _, grads = optim_lib.accumulate_gradients(loss_fn, params0, batch, grad_accum)
    updates, opt_state = optimizer.update(grads, opt_state, params0)
    return opt_state, jax.tree.map(lambda d, u: d + u.astype(d.dtype), direction, updates)

  return replay_step


def replay_direction(
    replay_step: Callable, optimizer: optax.GradientTransformation, params0: Any, batches: Iterable[Any]
) -> Any:
  """D = the sum of the optimizer's updates over `batches`, every gradient taken at params0 (float32)."""
  opt_state = optimizer.init(params0)
  direction = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params0)
  for batch in batches:
    opt_state, direction = replay_step(params0, opt_state, direction, batch)
  return direction


def shifted(params0: Any, direction: Any, scale: float) -> Any:
  """params0 + scale * direction, in the params' dtypes."""
  return jax.tree.map(lambda p, d: (p.astype(jnp.float32) + scale * d).astype(p.dtype), params0, direction)


def dense_pair_logps(model: Any, params: Any, batch: dict[str, jax.Array]) -> jax.Array:
  """[2, P] summed response log-probs (chosen, rejected) of a packed batch (data/packing.py) through dense float32
  logits at the response slots: `forward.packed_pair_logps` without its custom-VJP head (same values to float32
  rounding), so forward mode goes through it."""
  hidden_BRD = forward.response_hidden(forward.packed_forward_hidden(model, params, batch), batch)
  logits_BRV = jnp.einsum(
      "brd,dv->brv", hidden_BRD.astype(jnp.float32), forward.unembed(model, params).astype(jnp.float32)
  )
  live_BR = batch["response_side_BR"] > 0  # packing.CHOSEN = 1, REJECTED = 2
  labels_BR = jnp.where(live_BR, batch["response_label_BR"], 0)
  logp_BR = jnp.take_along_axis(jax.nn.log_softmax(logits_BRV, axis=-1), labels_BR[..., None], axis=-1)[..., 0]
  logp_BR = jnp.where(live_BR, logp_BR, 0.0)
  return jnp.stack([forward.per_pair_sum(logp_BR, batch, side) for side in (1, 2)])


def reference_model(model: Any) -> Any:
  """The same Transformer with reference attention (no custom VJP: forward-mode differentiable)."""
  return transformer.Transformer(model.config.replace(attention_impl="reference"))


def make_first_order(model: Any) -> Callable[[Any, Any, dict[str, jax.Array]], jax.Array]:
  """first_order(params0, direction, batch) -> [2, B]: <grad ln pi(y+-), direction> of each pair (jax.jvp)."""
  ref = reference_model(model)

  def first_order(params0: Any, direction: Any, batch: dict[str, jax.Array]) -> jax.Array:
    tangent = jax.tree.map(lambda p, d: d.astype(p.dtype), params0, direction)
    return jax.jvp(lambda p: dense_pair_logps(ref, p, batch), (params0,), (tangent,))[1]

  return jax.jit(first_order)


def predict(
    at0: np.ndarray,
    logps_fn: Callable[[Any], np.ndarray],
    first_order_fn: Callable[[Any], np.ndarray],
    params0: Any,
    direction: Any,
) -> dict[str, np.ndarray]:
  """Per-pair predictions of the change of the log-probs along `direction`: {'first_order', 'along_direction',
  'curvature'}, each [2, N] (chosen, rejected). `at0` [2, N]: the log-probs at params0; `logps_fn(params)` -> [2, N]
  runs the forwards over the pairs, `first_order_fn(direction)` -> [2, N] the JVPs at params0 (module docstring)."""
  at0 = np.asarray(at0, np.float64)
  along = np.asarray(logps_fn(shifted(params0, direction, 1.0)), np.float64) - at0
  first = np.asarray(first_order_fn(direction), np.float64)
  return {"first_order": first, "along_direction": along, "curvature": along - first}
