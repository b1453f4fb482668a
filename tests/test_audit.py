"""The displacement audit's replay route (displacement_jax/audit/replay.py) on the tiny random Llama.

References outside the code under test: autodiff (jax.jacrev of the dense reference path), the optimizers' update
rules written out by hand (torch's RMSprop defaults, Adam's bias-corrected moments), and a measured SGD step.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from displacement_jax import forward
from displacement_jax.audit import replay as audit
from displacement_jax.train import optim as optim_lib
from displacement_jax.experiments import edit_pairs, short_runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import demo as demo_config  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope="module")
def session(tmp_path_factory):
  config = demo_config.get_config("tiny")
  config.output_dir = str(tmp_path_factory.mktemp("audit"))
  s = short_runs.Session(config)
  return s, s.dataset(edit_pairs.rows("edit", limit=8), "edit")


def test_first_order_equals_autodiff_inner_product(session):
  """<grad ln pi(y+-)_i, D> by forward mode (audit.make_directional_derivatives) equals the inner product of the per-pair
  gradients (jax.jacrev of the same dense path) with D, for a random direction D."""
  s, dataset = session
  params = s.params0
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  direction = jax.tree.unflatten(treedef, [1e-3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
  batch = s._collate(dataset.pairs[:4], dataset.pad_id, 4, packed=True)
  first = np.asarray(audit.make_directional_derivatives(s.loaded.model, order=1)(params, direction, batch))[0]
  ref = audit.reference_model(s.loaded.model)
  jac = jax.jacrev(lambda p: audit.dense_pair_logps(ref, p, batch))(params)  # leaves [2, P, ...]
  inner = sum(
      jnp.tensordot(j, d, axes=d.ndim) for j, d in zip(jax.tree.leaves(jac), jax.tree.leaves(direction))
  )  # [2, B]
  np.testing.assert_allclose(first, np.asarray(inner), rtol=1e-5, atol=1e-6)
  # and the dense path equals the fast one (chunked head, blocked attention) to float32 rounding
  fast = jax.jit(lambda p, b: forward.pair_logps(s.loaded.model, p, b, 64))(params, batch)
  np.testing.assert_allclose(
      np.asarray(audit.dense_pair_logps(ref, params, batch)),
      np.stack([fast["chosen_logps_B"], fast["rejected_logps_B"]]),
      rtol=1e-5,
  )


def test_second_derivative_equals_forward_over_reverse_and_finite_differences(session):
  """D^T H D of each pair's log-prob by forward-over-forward mode equals d^2/dt^2 f(theta0 + t D) at t = 0 by
  forward-over-reverse mode (jax.jacfwd of jax.jacrev through the same dense path) and by a central second
  difference in float64 (h = 0.1; truncation ~h^2, float32 rounding ~1e-4); the first derivative is unchanged by
  asking for the second."""
  s, dataset = session
  params = s.params0
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  direction = jax.tree.unflatten(treedef, [1e-2 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
  batch = s._collate(dataset.pairs[:4], dataset.pad_id, 4, packed=True)
  d1, d2 = np.asarray(audit.make_directional_derivatives(s.loaded.model, order=2)(params, direction, batch))
  ref = audit.reference_model(s.loaded.model)
  along = lambda t: audit.dense_pair_logps(ref, audit.shifted(params, direction, t), batch)  # [2, B]
  np.testing.assert_allclose(d2, np.asarray(jax.jacfwd(jax.jacrev(along))(0.0)), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(d1, np.asarray(jax.jacrev(along)(0.0)), rtol=1e-4, atol=1e-6)
  f = lambda t: np.asarray(jax.jit(along)(t), np.float64)
  h = 0.1
  np.testing.assert_allclose(d2, (f(h) - 2 * f(0.0) + f(-h)) / h**2, rtol=3e-2, atol=2e-2)
  assert np.abs(d2).max() > 1e-4  # the check is not vacuous


@pytest.mark.parametrize("name", ["rmsprop", "adamw"])
def test_replay_direction_is_linear_in_the_learning_rate(session, name):
  """D(3 lr) = 3 D(lr): what lets one replay serve every lr of a search (edit_search.Auditor, audit.orders)."""
  s, dataset = session
  d_a = s.direction(dataset, {"optim.name": name, "optim.lr": 1e-4})
  d_b = s.direction(dataset, {"optim.name": name, "optim.lr": 3e-4})
  for a, b in zip(jax.tree.leaves(d_a), jax.tree.leaves(d_b)):
    np.testing.assert_allclose(np.asarray(b), 3 * np.asarray(a), rtol=1e-5, atol=1e-12)
  assert max(float(jnp.abs(a).max()) for a in jax.tree.leaves(d_a)) > 0


@pytest.mark.parametrize("name", ["rmsprop", "adamw"])
def test_replay_sums_the_optimizers_updates_at_fixed_params(name):
  """The same gradient g twice at fixed params: D = u1 + u2 with each optimizer's rule written out."""
  lr, g = 1e-3, jnp.array([0.5, -2.0, 1e-3, 0.0], jnp.float32)
  params0 = {"w": jnp.zeros(4, jnp.float32)}
  loss_fn = lambda p, batch: (jnp.vdot(g, p["w"]), {})  # gradient g everywhere
  cfg = optim_lib_config(name, lr)
  opt = optim_lib.make_optimizer(cfg, 2)
  replay = audit.make_replay_step(loss_fn, opt)
  D = np.asarray(audit.replay_direction(replay, opt, params0, [{}, {}])["w"], np.float64)
  g64 = np.asarray(g, np.float64)
  if name == "rmsprop":  # torch: v <- 0.99 v + 0.01 g^2; update -lr g / (sqrt(v) + 1e-8)
    v1 = 0.01 * g64**2
    v2 = 0.99 * v1 + 0.01 * g64**2
    expected = -lr * g64 / (np.sqrt(v1) + 1e-8) - lr * g64 / (np.sqrt(v2) + 1e-8)
  else:  # Adam, bias-corrected: both steps have m_hat = g, v_hat = g^2
    expected = 2 * (-lr * g64 / (np.abs(g64) + 1e-8))
  np.testing.assert_allclose(D, expected, rtol=2e-5, atol=1e-12)


def optim_lib_config(name: str, lr: float):
  import ml_collections  # pylint: disable=g-import-not-at-top

  return ml_collections.ConfigDict({"name": name, "lr": lr})


def test_replay_state_equals_optax_state_after_the_same_steps():
  """The optimizer state the replay carries equals optax's after the same gradients (updates not applied)."""
  opt = optax.adam(1e-2)
  params0 = {"w": jnp.arange(3.0)}
  grads = [jnp.array([1.0, -2.0, 3.0]), jnp.array([0.5, 0.5, -1.0])]
  batches = [{"g": g} for g in grads]
  loss_fn = lambda p, b: (jnp.vdot(b["g"], p["w"]), {})
  replay = audit.make_replay_step(loss_fn, opt)
  state, direction = opt.init(params0), jax.tree.map(jnp.zeros_like, params0)
  for b in batches:
    state, direction = replay(params0, state, direction, b)
  ref_state, total = opt.init(params0), 0.0
  for g in grads:
    u, ref_state = opt.update({"w": g}, ref_state, params0)
    total = total + u["w"]
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(direction["w"]), np.asarray(total), rtol=1e-6)


def test_sgd_first_order_predicts_the_measured_step(session):
  """SGD, one epoch at a small lr: the audit's first order (and the model at theta0 + D) equal the measured change
  of every pair's ln pi(y+) and ln pi(y-) to first order in lr."""
  s, dataset = session
  overrides = {"optim.name": "sgd", "optim.lr": 1e-3}
  pred = s.audit(dataset, overrides, order=2)
  measured = s.train(dataset, overrides)
  changes = np.stack([measured.chosen_change(), measured.rejected_change()])
  scale = np.abs(changes).max()
  assert scale > 1e-3  # the step moved the log-probs
  np.testing.assert_allclose(pred["first_order"], changes, atol=0.02 * scale)
  np.testing.assert_allclose(pred["along_direction"], changes, atol=0.02 * scale)
  np.testing.assert_allclose(pred["curvature"], pred["along_direction"] - pred["first_order"], atol=1e-9)
  # Taylor: along 10 D (curvature ~1e-4 there, above float32 rounding of the sums, ~2e-5 at D itself) the second
  # order is much closer to the model than the first order is
  at0 = np.stack(s.logps(s.params0, dataset))
  direction = s.direction(dataset, overrides, start=(at0[0], at0[1]))
  derivs = s.derivatives(direction, dataset, order=2)
  along = audit.along_direction(
      at0, lambda p: np.stack(s.logps(p, dataset)), s.params0, jax.tree.map(lambda x: 10.0 * x, direction)
  )
  scaled = audit.orders(derivs[0], derivs[1], along, scale=10.0)
  err1 = np.abs(scaled["first_order"] - along).max()
  err2 = np.abs(scaled["second_order"] - along).max()
  assert err1 > 1e-4 and err2 < 0.3 * err1, (err1, err2)


def test_cli_writes_one_row_per_pair_and_flags_what_theta0_plus_d_says(tmp_path, capsys):
  """`python -m displacement_jax.audit` on the train config of configs/dpo_tiny.py: a row per pair, the flag is the
  sign of the prediction at theta0 + D, the summary is its rows; bad usage is one line, exit 2."""
  from displacement_jax.audit import main as audit_main  # pylint: disable=g-import-not-at-top  (an entry point)

  config_path = os.path.join(ROOT, "configs", "dpo_tiny.py")
  rc = audit_main.main(["audit", f"--config={config_path}", f"--config.output_dir={tmp_path}", "--config.num_steps=0"])
  assert rc == 0
  rows = [json.loads(line) for line in open(tmp_path / audit_main.ROWS_FILE)]
  summary = json.load(open(tmp_path / audit_main.SUMMARY_FILE))
  assert [r["row"] for r in rows] == list(range(len(rows))) == list(range(summary["num_pairs"]))
  assert all(r["flag"] == (r["chosen_along_direction"] < 0) for r in rows)
  assert all(np.isfinite(r["chosen_second_order"]) for r in rows)  # audit.order defaults to 2
  np.testing.assert_allclose(
      [r["chosen_curvature"] for r in rows],
      [r["chosen_along_direction"] - r["chosen_first_order"] for r in rows],
      atol=1e-9,
  )
  np.testing.assert_allclose(summary["share_flagged"], np.mean([r["flag"] for r in rows]))
  out = capsys.readouterr().out
  assert "[audit] the 10 pairs predicted to fall most" in out and out.count("[audit]   row ") == 10
  rc = audit_main.main(["audit", f"--config={config_path}", f"--config.output_dir={tmp_path}", "--config.num_steps=3"])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc in (1, 2) and len(err) == 1 and "num_steps" in err[0]
