"""Displacement audit, replay route: predict per pair, before training, how a configured run moves ln pi(y+).

The run's batches (the same iterator, seed and order as training) are replayed at the INITIAL parameters:
each batch's loss gradient at theta0 goes through the configured optimizer (RMSprop / AdamW / SGD, its state
building from zero exactly as in training: second moments, bias correction, Adam's first moment) and the
updates are summed, never applied, into one direction D = sum_t delta theta_t. Then for every pair i:

  first order    <grad ln pi(y+_i), D>: a forward-mode derivative (jax.jvp) along D, on the model with its
                 reference attention and a dense log-softmax at the response slots of the packed layout (the
                 fast kernels define custom VJPs, which have no JVP rule), a few pairs at a time;
  second order   first order + 1/2 D^T H D, with D^T H D = d^2/dt^2 f(theta0 + t D) at t = 0: forward-over-
                 forward mode (a JVP of the JVP) on the same path, the Hessian-vector product along D;
  along D        f(theta0 + D) - f(theta0): the model evaluated at the summed update (all orders along D);
  curvature      along D minus first order (second and higher orders along D).

f = ln pi(y+_i) (and ln pi(y-_i)). Cost: one backward per batch (as one epoch of training) and one JVP and two
forwards over the pairs. What is approximated: every update is taken at theta0 (the gradients do not move with the
parameters), so the prediction is exact to first order in the learning rate and misses how the gradients
change along the run; docs/results.md measures where that holds. The forward-mode derivative runs on the
model's reference path because the fast kernels define custom VJPs (no JVP rule).

LoRA: every kernel takes the fixed base params as `base` (None otherwise) and theta0, D are the adapters
(`lora.full_params(base, adapters)` is what the model sees), as the LoRA train step differentiates them.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from displacement_jax import forward, gradients
from displacement_jax.models import lora, transformer

JVP_PAIRS = 8  # pairs per forward-mode pass (its dense [rows, response slots, V] float32 logits are its memory)


def make_replay_step(loss_fn: Callable, optimizer: optax.GradientTransformation, grad_accum: int = 1) -> Callable:
  """replay_step(params0, opt_state, direction, batch, base=None) -> (opt_state, direction): the update the optimizer
  would make from this batch's gradient AT params0, added to `direction` (params0 itself never changes). With
  `base` (LoRA) params0 are the adapters and `loss_fn` sees the base combined with them (`lora.full_params`)."""

  def replay_step(
      params0: Any, opt_state: Any, direction: Any, batch: dict[str, jax.Array], base: Any = None
  ) -> tuple[Any, Any]:
    loss = lambda p, b: loss_fn(lora.full_params(base, p), b)
    _, _, grads = gradients.accumulate_gradients(loss, params0, batch, grad_accum)
    updates, opt_state = optimizer.update(grads, opt_state, params0)
    return opt_state, jax.tree.map(lambda d, u: d + u.astype(d.dtype), direction, updates)

  return replay_step


def replay_direction(
    replay_step: Callable,
    optimizer: optax.GradientTransformation,
    params0: Any,
    batches: Iterable[Any],
    base: Any = None,
) -> Any:
  """D = the sum of the optimizer's updates over `batches`, every gradient taken at params0 (float32; with `base`,
  LoRA: over the adapters params0)."""
  opt_state = optimizer.init(params0)
  direction = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params0)
  for batch in batches:
    opt_state, direction = replay_step(params0, opt_state, direction, batch, base)
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


def make_directional_derivatives(model: Any, order: int = 2) -> Callable[..., jax.Array]:
  """derivatives(params0, direction, batch, base=None) -> [order, 2, B]: the first (and, with order 2, second)
  derivative of t -> ln pi(y+-)(theta0 + t direction) at t = 0 of each pair ([order, chosen/rejected, pair]); the
  first is <grad ln pi, direction> (jax.jvp), the second direction^T H direction (jax.jvp of that jax.jvp). With
  `base` (LoRA) theta are the adapters params0 on the fixed base (`lora.full_params`)."""
  if order not in (1, 2):
    raise ValueError(f"audit: order must be 1 or 2, got {order}")
  ref = reference_model(model)

  def derivatives(params0: Any, direction: Any, batch: dict[str, jax.Array], base: Any = None) -> jax.Array:
    tangent = jax.tree.map(lambda p, d: d.astype(p.dtype), params0, direction)

    def first(p: Any) -> jax.Array:
      return jax.jvp(lambda q: dense_pair_logps(ref, lora.full_params(base, q), batch), (p,), (tangent,))[1]

    if order == 1:
      return first(params0)[None]
    return jnp.stack(jax.jvp(first, (params0,), (tangent,)))

  return jax.jit(derivatives)


def predict(
    at0: np.ndarray,
    logps_fn: Callable[[Any], np.ndarray],
    derivatives_fn: Callable[[Any], np.ndarray],
    params0: Any,
    direction: Any,
) -> dict[str, np.ndarray]:
  """Per-pair predictions of the change of the log-probs along `direction`: {'first_order', 'second_order',
  'along_direction', 'curvature'}, each [2, N] (chosen, rejected). `at0` [2, N]: the log-probs at params0;
  `logps_fn(params)` -> [2, N] runs the forwards over the pairs, `derivatives_fn(direction)` -> [order, 2, N] the
  directional derivatives at params0 (`make_directional_derivatives`; module docstring). Without the second
  derivative (order 1) there is no 'second_order'."""
  along = along_direction(at0, logps_fn, params0, direction)
  derivs = np.asarray(derivatives_fn(direction), np.float64)
  return orders(derivs[0], derivs[1] if len(derivs) > 1 else None, along)


def along_direction(at0: np.ndarray, logps_fn: Callable[[Any], np.ndarray], params0: Any, direction: Any) -> np.ndarray:
  """[2, N]: f(theta0 + direction) - f(theta0) for every pair (one forward pass over the pairs)."""
  return np.asarray(logps_fn(shifted(params0, direction, 1.0)), np.float64) - np.asarray(at0, np.float64)


def orders(d1: np.ndarray, d2: np.ndarray | None, along: np.ndarray, scale: float = 1.0) -> dict[str, np.ndarray]:
  """The predictions for the direction `scale` * D from D's directional derivatives d1, d2 [2, N] (first order
  scale d1; second order scale d1 + scale^2 d2 / 2, when d2 is given) and the model's change along scale * D,
  `along` [2, N]. The replay's D is linear in the learning rate (every update is taken at theta0 and each
  optimizer's update is lr times a function of the gradients), so one D serves every lr with scale = lr / lr_D."""
  first = scale * np.asarray(d1, np.float64)
  out = {"first_order": first, "along_direction": along, "curvature": along - first}
  if d2 is not None:
    out["second_order"] = first + 0.5 * scale**2 * np.asarray(d2, np.float64)
  return out
