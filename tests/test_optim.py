"""optim: torch-default RMSprop / AdamW / SGD equal torch.optim; accumulation averages; schedules; clipping."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch

from displacement_jax import gradients
from displacement_jax.train import optim


def _config(**kw):
  base = dict(
      name="rmsprop",
      lr=1e-2,
      schedule="constant",
      warmup_steps=0,
      clip=0.0,
      grad_accum=1,
      weight_decay=0.0,
      momentum=0.0,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      decay=0.99,
  )
  base.update(kw)
  return ml_collections.ConfigDict(base)


def _run_ours(opt, w0, grads):
  params = {"w": jnp.asarray(w0)}
  state = opt.init(params)
  for g in grads:
    updates, state = opt.update({"w": jnp.asarray(g)}, state, params)
    params = optax.apply_updates(params, updates)
  return np.asarray(params["w"])


def _run_torch(make, w0, grads):
  w = torch.nn.Parameter(torch.tensor(w0, dtype=torch.float64))
  opt = make([w])
  for g in grads:
    opt.zero_grad()
    w.grad = torch.tensor(g, dtype=torch.float64)
    opt.step()
  return w.detach().numpy()


@pytest.mark.parametrize(
    "name,make",
    [
        ("rmsprop", lambda p: torch.optim.RMSprop(p, lr=1e-2)),
        ("adamw", lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1)),
        ("sgd", lambda p: torch.optim.SGD(p, lr=1e-2)),
    ],
)
def test_matches_torch_defaults(name, make):
  rng = np.random.default_rng(0)
  w0 = rng.normal(size=(5, 3)).astype(np.float32)
  grads = [rng.normal(size=(5, 3)).astype(np.float32) * s for s in (1.0, 0.1, 3.0, 0.01, 1.0)]
  ours = _run_ours(optim.make_optimizer(_config(name=name, weight_decay=0.1), 5), w0, grads)
  ref = _run_torch(make, w0.astype(np.float64), [g.astype(np.float64) for g in grads])
  np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=1e-6)


def test_rmsprop_first_step_formula():
  # v = 0.01 g^2 -> step = lr g / (0.1 |g| + 1e-8): a sign step of size 10 lr.
  g = np.array([2.0, -0.5], np.float32)
  out = _run_ours(optim.make_optimizer(_config(lr=1e-3), 1), np.zeros(2, np.float32), [g])
  np.testing.assert_allclose(out, -1e-3 * g / (0.1 * np.abs(g) + 1e-8), rtol=1e-6)


def test_accumulation_averages_micro_batches():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(8,)), jnp.float32)
  params = {"w": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}

  def loss_fn(p, b):
    err = b["x"] @ p["w"] - b["y"]
    return jnp.mean(err**2), {"mean_err": jnp.mean(err)}

  (full_loss, full_aux), full_grad = jax.value_and_grad(loss_fn, has_aux=True)(params, {"x": x, "y": y})
  loss, aux, grads = jax.jit(lambda p, b: gradients.accumulate_gradients(loss_fn, p, b, 4))(params, {"x": x, "y": y})
  np.testing.assert_allclose(loss, full_loss, rtol=1e-6)
  np.testing.assert_allclose(aux["mean_err"], full_aux["mean_err"], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(grads["w"], full_grad["w"], rtol=1e-5, atol=1e-7)


def test_split_micro_batches_is_strided_and_checked():
  out = gradients.split_micro_batches({"a": np.arange(6)}, 2)
  np.testing.assert_array_equal(out["a"], [[0, 2, 4], [1, 3, 5]])
  with pytest.raises(ValueError, match="field 'a'.*grad_accum=4"):
    gradients.split_micro_batches({"a": np.arange(6)}, 4)


def test_schedules_and_clipping():
  lin = optim.make_schedule("linear", 1.0, num_steps=10, warmup_steps=2)
  np.testing.assert_allclose([lin(0), lin(1), lin(2), lin(6), lin(10)], [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)
  cos = optim.make_schedule("cosine", 1.0, num_steps=4, warmup_steps=0)
  np.testing.assert_allclose([cos(0), cos(2), cos(4)], [1.0, 0.5, 0.0], atol=1e-6)
  opt = optim.make_optimizer(_config(name="sgd", lr=1.0, clip=1.0), 1)
  out = _run_ours(opt, np.zeros(2, np.float32), [np.array([3.0, 4.0], np.float32)])
  np.testing.assert_allclose(out, [-0.6, -0.8], rtol=1e-6)


def test_bad_optimizer_config():
  with pytest.raises(ValueError, match="optim.name"):
    optim.make_optimizer(_config(name="adam9"), 1)
  with pytest.raises(ValueError, match="optim.schedule"):
    optim.make_optimizer(_config(schedule="step"), 1)
  with pytest.raises(ValueError, match="optim.lr"):
    optim.make_optimizer(_config(lr=0.0), 1)
