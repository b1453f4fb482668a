"""The train step's NaN/inf guard (step.make_train_step): guard='state' and guard='gradients' against each other and
against the input state on a skipped update, on a toy loss whose gradient is written out by hand."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from displacement_jax.train import optim as optim_lib
from displacement_jax.train import step as step_lib


@jax.custom_vjp
def _scaled_gradient(x, k):
  """x, with its incoming gradient multiplied by k (k = inf: a finite loss with a non-finite gradient)."""
  return x


_scaled_gradient.defvjp(lambda x, k: (x, k), lambda k, ct: (ct * k, jnp.zeros_like(k)))


def _loss_fn(params, batch):
  """0.5 * scale * ||w - target||^2 + ||b||^2: `scale` NaN poisons the loss, `grad_scale` inf only the gradient."""
  w = _scaled_gradient(params["w"], batch["grad_scale"])
  loss = 0.5 * batch["scale"] * jnp.sum((w - batch["target"]) ** 2) + jnp.sum(params["b"] ** 2)
  return loss, {}


def _state(optimizer):
  params = {"w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3) / 7, "b": jnp.ones((3,), jnp.float32)}
  return step_lib.TrainState(
      params=params,
      opt_state=optimizer.init(params),
      step=jnp.zeros((), jnp.int32),
      rng=jax.random.key_data(jax.random.key(0)),
  )


def _batch(scale=1.0, grad_scale=1.0):
  return {
      "target": jnp.full((2, 3), 0.5, jnp.float32),
      "scale": jnp.float32(scale),
      "grad_scale": jnp.float32(grad_scale),
      "chosen_attention_mask_BT": jnp.ones((1, 2), jnp.int32),  # metrics["tokens"] counts them
      "rejected_attention_mask_BT": jnp.ones((1, 2), jnp.int32),
  }


def _optimizer():
  cfg = ml_collections.ConfigDict(
      {"name": "rmsprop", "lr": 1e-2, "schedule": "constant", "warmup_steps": 0, "clip": 0.0}
  )
  cfg.update(
      {"grad_accum": 1, "weight_decay": 0.0, "momentum": 0.0, "eps": 1e-8, "decay": 0.99, "b1": 0.9, "b2": 0.999}
  )
  return optim_lib.make_optimizer(cfg, 10)


def _assert_trees_equal(a, b, rtol=0.0):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=0)


def test_both_guards_take_the_same_finite_steps():
  optimizer = _optimizer()
  steps = {g: jax.jit(step_lib.make_train_step(_loss_fn, optimizer, 1, g)) for g in optim_lib.GUARDS}
  states = {g: _state(optimizer) for g in optim_lib.GUARDS}
  for _ in range(3):
    out = {g: steps[g](states[g], _batch()) for g in optim_lib.GUARDS}
    states = {g: out[g][0] for g in optim_lib.GUARDS}
    assert all(int(out[g][1]["nonfinite"]) == 0 for g in optim_lib.GUARDS)
    _assert_trees_equal(states["state"], states["gradients"], rtol=1e-6)  # the update fused differently: 1 ulp
  # RMSprop's first step moves each coordinate by lr / sqrt(1 - decay) against its gradient's sign (w - 0.5, b)
  assert int(states["gradients"].step) == 3 and not np.allclose(
      states["gradients"].params["w"], _state(optimizer).params["w"]
  )


@pytest.mark.parametrize("guard", optim_lib.GUARDS)
@pytest.mark.parametrize("poison, code", [({"scale": np.nan}, 1), ({"grad_scale": np.inf}, 2)])
def test_a_nonfinite_loss_or_gradient_skips_the_update_exactly(guard, poison, code):
  optimizer = _optimizer()
  step = jax.jit(step_lib.make_train_step(_loss_fn, optimizer, 1, guard))
  state, _ = step(_state(optimizer), _batch())  # one good step first: a non-trivial optimizer state
  new_state, metrics = step(state, _batch(**poison))
  assert step_lib.NONFINITE[int(metrics["nonfinite"])] == ("loss", "gradient norm")[code - 1]
  if code == 2:
    assert np.isfinite(float(metrics["loss"])) and not np.isfinite(float(metrics["grad_norm"]))
  _assert_trees_equal(new_state, state)


def test_unknown_guard_is_refused():
  with pytest.raises(ValueError, match="guard must be one of"):
    step_lib.make_train_step(_loss_fn, _optimizer(), 1, "params")
