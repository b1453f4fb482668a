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
from displacement_jax.data import packing
from displacement_jax.models import lora
from displacement_jax.audit import replay as audit
from displacement_jax.audit import sketch
from displacement_jax.train import optim as optim_lib
from displacement_jax.experiments import edit_pairs, short_runs
from tests import short_run

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
  flags = ["--config.num_steps=0", "--config.audit.decompose=False"]  # the decomposition: the second run
  rc = audit_main.main(["audit", f"--config={config_path}", f"--config.output_dir={tmp_path}", *flags])
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
  # the decomposition without projection: own + others rebuild the first order; top contributors push down; the
  # audit filter drops the pairs the others push down most, as filtered.jsonl ready for train
  flags = ["--config.num_steps=0", "--config.audit.sketch=none", "--config.audit.order=1"]
  flags += ["--config.audit.filter.mode=drop_highest_k", "--config.audit.filter.k=2"]
  rc = audit_main.main(["audit", f"--config={config_path}", f"--config.output_dir={tmp_path}", *flags])
  assert rc == 0
  rows = [json.loads(line) for line in open(tmp_path / audit_main.ROWS_FILE)]
  first = np.array([r["chosen_first_order"] for r in rows])
  own, others = np.array([r["chosen_own"] for r in rows]), np.array([r["chosen_others"] for r in rows])
  np.testing.assert_allclose(own + others, first, atol=1e-4 * np.abs(first).max())
  for r in rows:
    values = [c["contribution"] for c in r["top_contributors"]]
    assert (
        values == sorted(values)
        and all(v < 0 for v in values)
        and r["row"] not in [c["row"] for c in r["top_contributors"]]
    )
    assert (r["displaced_by"] == "none") == (r["chosen_own"] + r["chosen_others"] >= 0)
    assert r["audit_others_fall"] == -r["chosen_others"] and r["audit_fall"] == -r["chosen_along_direction"]
  record = json.load(open(tmp_path / "filtered_indices.json"))
  riskiest = sorted(rows, key=lambda r: -r["audit_others_fall"])[:2]
  assert record["measure"] == "audit_others_fall" and sorted(record["dropped"]) == sorted(r["index"] for r in riskiest)
  assert sum(1 for _ in open(tmp_path / "filtered.jsonl")) == len(rows) - 2 == record["num_selected"]
  capsys.readouterr()
  rc = audit_main.main(["audit", f"--config={config_path}", f"--config.output_dir={tmp_path}", "--config.num_steps=3"])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc in (1, 2) and len(err) == 1 and "num_steps" in err[0]
  bad = ["--config.num_steps=0", "--config.audit.filter.mode=drop_highest_k", "--config.audit.filter.measure=ches"]
  rc = audit_main.main(["audit", f"--config={config_path}", f"--config.output_dir={tmp_path}", *bad])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc in (1, 2) and len(err) == 1 and "audit.filter.measure" in err[0]
  lora_dropout = ["--config.model.lora.rank=4", "--config.model.lora.dropout=0.1"]  # the replay has no dropout
  rc = audit_main.main(
      ["audit", f"--config={config_path}", f"--config.output_dir={tmp_path}", *flags[:1], *lora_dropout]
  )
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1 and "lora.dropout" in err[0]


# --- the decomposition (audit/decompose.py) and its projections (audit/sketch.py) ---------------------------------


@pytest.mark.parametrize(
    "optim",
    [
        {"name": "sgd", "momentum": 0.9, "clip": 1.0},
        {"name": "rmsprop"},
        {"name": "rmsprop", "momentum": 0.5, "clip": 1.0, "schedule": "linear", "warmup_steps": 1},
        {"name": "adamw"},
        {"name": "adamw", "b1": 0.8, "clip": 1.0, "schedule": "cosine"},
    ],
    ids=["sgd-momentum-clip", "rmsprop", "rmsprop-momentum-clip-linear", "adamw", "adamw-clip-cosine"],
)
def test_decomposition_weights_rebuild_the_replayed_direction(optim):
  """Pairs with known gradients G_j (loss = mean_j <G_j, params>), 3 batches over 4 pairs: the per-pair weights
  W_j (the preconditioners read from optax's state, clip factors, schedule, momentum written out in
  decompose.step_weights) rebuild the replay's D = -sum_j W_j * G_j; RMSprop's and Adam's preconditioners equal
  1 / (sqrt(v_t) + eps) with v_t written out from the gradients (torch's and Adam's rules)."""
  import ml_collections  # pylint: disable=g-import-not-at-top

  from displacement_jax.audit import decompose  # pylint: disable=g-import-not-at-top

  cfg = ml_collections.ConfigDict({"lr": 1e-2, "grad_accum": 1, **optim})
  rng = np.random.default_rng(0)
  G = {"w": rng.normal(size=(4, 5)).astype(np.float32), "u": rng.normal(size=(4, 2, 3)).astype(np.float32)}
  params0 = {"w": jnp.zeros(5), "u": jnp.zeros((2, 3))}
  batches = [[0, 1], [2, 3], [1, 2]]  # positions; pair 1 and 2 appear twice (two "epochs")
  loss_fn = lambda p, b: (jnp.mean(jnp.einsum("bi,i->b", b["w"], p["w"]) + jnp.einsum("bij,ij->b", b["u"], p["u"])), {})
  optimizer = optim_lib.make_optimizer(cfg, len(batches))
  settings = decompose.settings(ml_collections.ConfigDict({"audit": {"sketch": "none"}}))
  record = decompose.make_recording_step(loss_fn, optimizer, cfg, settings)
  opt_state, direction = optimizer.init(params0), jax.tree.map(jnp.zeros_like, params0)
  gammas, qs, v = [], [], {k: 0.0 for k in G}
  for t, where in enumerate(batches, start=1):
    batch = {k: jnp.asarray(x[where]) for k, x in G.items()}
    opt_state, direction, gamma, q = record(params0, opt_state, direction, batch, jnp.int32(t))
    gammas.append(float(gamma))
    qs.append(None if q is None else {k: np.asarray(x) for k, x in q.items()})
    if cfg.name != "sgd":  # v_t from the (clipped) batch gradient, written out
      g = {k: float(gamma) * np.mean(x[where], axis=0).astype(np.float64) for k, x in G.items()}
      a = 0.99 if cfg.name == "rmsprop" else 0.999
      v = {k: a * v[k] + (1 - a) * g[k] ** 2 for k in G}
      corr = 1.0 if cfg.name == "rmsprop" else 1 - 0.999**t
      for k in G:
        np.testing.assert_allclose(q[k], 1 / (np.sqrt(v[k] / corr) + 1e-8), rtol=1e-4)
  schedule = optim_lib.make_schedule(cfg.get("schedule", "constant"), cfg.lr, len(batches), cfg.get("warmup_steps", 0))
  weights = decompose.step_weights(cfg, [float(schedule(t)) for t in range(len(batches))], qs)
  rebuilt = {k: np.zeros(x.shape[1:]) for k, x in G.items()}
  for j in range(4):
    steps = [s for s, where in enumerate(batches) if j in where]
    W = decompose.pair_weight(steps, gammas, weights, 2)
    for k in G:
      rebuilt[k] -= (W[k] if isinstance(W, dict) else W) * G[k][j]
  for k in G:
    np.testing.assert_allclose(rebuilt[k], np.asarray(direction[k]), rtol=2e-5, atol=1e-7)


def test_chunked_per_pair_gradients_equal_autodiff_per_pair(session):
  """The decomposition's batched per-pair gradients (decompose.make_chunk_sketches: jax.vmap over rows of one pair
  each, 3 pairs and a filler row, no projection) equal each pair's gradient of ln pi(y+) and ln pi(y-) taken on its
  own (rows of jax.jacrev on the training layout's batch of the same pairs, dense reference path), and the
  weighted loss gradient W * (dl/ds_w a + dl/ds_l b) too; the filler row gives zeros."""
  from displacement_jax.audit import decompose, sketch  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top

  s, dataset = session
  pairs = dataset.pairs[:3]
  shape = packing.packed_lengths(s._host_collate(pairs, dataset.pad_id, 3))
  rows = s._collate_rows(pairs, dataset.pad_id, 4, shape)
  leaves = sketch.select(s.params0, "all")
  keys = jax.random.split(jax.random.key(2), len(leaves))
  weight = {k: jax.random.uniform(key, x.shape, minval=0.5, maxval=2.0) for key, (k, x) in zip(keys, leaves.items())}
  dloss = jnp.asarray([[-0.3, 0.2], [-0.5, 0.4], [-0.1, 0.7], [0.0, 0.0]])
  settings = decompose.settings(ml_collections.ConfigDict({"audit": {"sketch": "none"}}))
  got = np.asarray(decompose.make_chunk_sketches(s.loaded.model, 16, settings)(s.params0, rows, dloss, weight, None))
  ref = audit.reference_model(s.loaded.model)
  batch = s._collate(pairs, dataset.pad_id, 3, packed=True)
  jac = jax.jacrev(lambda p: audit.dense_pair_logps(ref, p, batch))(s.params0)  # leaves [2, P, ...]
  w = np.asarray(sketch.project(weight, "none", 0))
  for i in range(3):
    grads = [
        np.asarray(sketch.project(sketch.select(jax.tree.map(lambda x: x[side, i], jac), "all"), "none", 0))
        for side in range(2)
    ]
    scale = max(np.abs(g).max() for g in grads)
    for side in range(2):
      np.testing.assert_allclose(got[i, side], grads[side], atol=2e-5 * scale)
    np.testing.assert_allclose(got[i, 2], w * (dloss[i, 0] * grads[0] + dloss[i, 1] * grads[1]), atol=4e-5 * scale)
  assert got.shape == (4, 3, sketch.size(leaves)) and not np.any(got[3])


def _tied_or_untied(model, params, tied):
  """The same network with its head tied to the embedding or untied (a separate random head)."""
  from displacement_jax.models import transformer  # pylint: disable=g-import-not-at-top

  if model.config.tie_word_embeddings == tied:
    return model, params
  model = transformer.Transformer(model.config.replace(tie_word_embeddings=tied))
  params = {k: v for k, v in params.items() if k != "lm_head"}
  if not tied:
    head = jax.random.normal(jax.random.key(4), params["embed_tokens"]["embedding"].T.shape) * 0.05
    params["lm_head"] = {"kernel": head}
  return model, params


@pytest.mark.parametrize("tied", [True, False])
def test_truncated_backward_gives_the_whole_gradient_on_the_subspace(session, tied):
  """With subspace 'head_and_last_layers' the per-pair gradients come from a model cut below the last layer
  (audit/truncated.py: the bottom layers' weights get no gradient, the top is fed their residual stream): they equal
  `sketch.select` of the whole model's gradient (jax.jacrev of the uncut dense reference path), with the head tied
  to the embedding (its gradient has the lookup's part too) and untied (a separate LM head)."""
  from displacement_jax.audit import decompose, sketch, truncated  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top

  s, dataset = session
  model, params = _tied_or_untied(s.loaded.model, s.params0, tied)
  assert model.config.tie_word_embeddings == tied and truncated.applies(model.config, "head_and_last_layers", 1)
  pairs = dataset.pairs[:2]
  shape = packing.packed_lengths(s._host_collate(pairs, dataset.pad_id, 2))
  rows = s._collate_rows(pairs, dataset.pad_id, 2, shape)
  dloss = jnp.asarray([[-0.3, 0.2], [-0.5, 0.4]])
  settings = decompose.settings(
      ml_collections.ConfigDict({"audit": {"sketch": "none", "subspace": "head_and_last_layers", "last_layers": 1}})
  )
  got = np.asarray(decompose.make_chunk_sketches(model, 16, settings)(params, rows, dloss, 1.0, None))
  batch = s._collate(pairs, dataset.pad_id, 2, packed=True)
  jac = jax.jacrev(lambda p: audit.dense_pair_logps(audit.reference_model(model), p, batch))(params)
  for i in range(2):
    for side in range(2):
      want = sketch.project(
          sketch.select(jax.tree.map(lambda x: x[side, i], jac), "head_and_last_layers", 1), "none", 0
      )
      want = np.asarray(want)
      np.testing.assert_allclose(got[i, side], want, atol=2e-5 * np.abs(want).max())


def test_outer_hash_count_sketch_is_its_per_coordinate_definition():
  """Count-sketch of the LM head's matrix (sketch.OUTER_LEAVES) hashes coordinate (r, c) to bucket (h(r) + h(c)) mod
  k with sign s(r) s(c) from one draw per row and per column: `project` of the matrix (tall and wide) equals that
  sum written out in numpy, and `outer_project` from factors (plus an embedding lookup's rows) equals `project`
  of the matrix they form."""
  k, rng = 32, np.random.default_rng(0)
  for shape in ((40, 6), (6, 40)):
    for name in sketch.OUTER_LEAVES:
      x = rng.normal(size=shape).astype(np.float32)
      bits = sketch.count_sketch_bits({name: x}, 3)
      rows, cols = (np.asarray(b, np.uint64) for b in bits[name])
      sign = (1.0 - 2.0 * (rows & 1))[:, None] * (1.0 - 2.0 * (cols & 1))[None, :]
      bucket = ((rows >> 1) % k)[:, None] + ((cols >> 1) % k)[None, :]
      want = np.zeros(k)
      np.add.at(want, (bucket % k).reshape(-1).astype(int), (sign * x).reshape(-1))
      got = np.asarray(sketch.project({name: jnp.asarray(x)}, "count_sketch", k, 3, bits))
      np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max())
  x_rows, x_cols = rng.normal(size=(5, 40)), rng.normal(size=(5, 6))  # 5 outer products of a [40, 6] matrix
  ids, vals = np.array([3, 17, 3, 39]), rng.normal(size=(4, 6))
  matrix = x_rows.T @ x_cols
  np.add.at(matrix, ids, vals)
  bits = sketch.count_sketch_bits({"embed_tokens/embedding": matrix}, 1)["embed_tokens/embedding"]
  want = sketch.project({"embed_tokens/embedding": jnp.asarray(matrix, jnp.float32)}, "count_sketch", k, 1, None)
  got = sketch.outer_project(jnp.asarray(x_rows), jnp.asarray(x_cols), bits, k, (jnp.asarray(ids), jnp.asarray(vals)))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5 * np.abs(np.asarray(want)).max())
  wide = sketch.outer_project(jnp.asarray(x_cols), jnp.asarray(x_rows), bits[::-1], k)  # the transposed matrix
  tall = sketch.outer_project(jnp.asarray(x_rows), jnp.asarray(x_cols), bits, k)
  np.testing.assert_allclose(np.asarray(wide), np.asarray(tall), atol=1e-5 * np.abs(np.asarray(tall)).max())


@pytest.mark.parametrize("tied", [True, False])
def test_factored_head_sketches_equal_the_dense_route(session, tied):
  """audit/factored.py (count-sketch on 'head_and_last_layers', packed rows): the head's S a and S b from factors
  and S(W * g) from one matrix per pair give what differentiating the whole model and projecting its dense
  gradients gives (make_chunk_sketches with truncate=False), with a per-coordinate W and the head tied (its lookup
  rows included) and untied; the filler row gives zeros."""
  from displacement_jax.audit import decompose, factored  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top

  s, dataset = session
  model, params = _tied_or_untied(s.loaded.model, s.params0, tied)
  pairs = dataset.pairs[:3]
  shape = packing.packed_lengths(s._host_collate(pairs, dataset.pad_id, 3))
  rows = s._collate_rows(pairs, dataset.pad_id, 4, shape)
  audit_settings = {"sketch": "count_sketch", "sketch_dim": 64, "subspace": "head_and_last_layers", "last_layers": 1}
  settings = decompose.settings(ml_collections.ConfigDict({"audit": audit_settings}))
  assert factored.applies(model.config, "head_and_last_layers", 1, "count_sketch", True)
  leaves = sketch.select(params, "head_and_last_layers", 1)
  bits = sketch.count_sketch_bits(leaves, 0)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  weight = {k: jax.random.uniform(key, x.shape, minval=0.5, maxval=2.0) for key, (k, x) in zip(keys, leaves.items())}
  dloss = jnp.asarray([[-0.3, 0.2], [-0.5, 0.4], [-0.1, 0.7], [0.0, 0.0]])
  fast = np.asarray(decompose.make_chunk_sketches(model, 16, settings)(params, rows, dloss, weight, bits))
  dense = decompose.make_chunk_sketches(model, 16, settings, truncate=False)(params, rows, dloss, weight, bits)
  dense = np.asarray(dense)
  np.testing.assert_allclose(fast, dense, atol=1e-5 * np.abs(dense).max())
  assert np.abs(dense[:3]).min(axis=-1).max() > 0 and not np.any(fast[3])


def test_restricted_direction_gives_the_subspace_inner_product(session):
  """sketch.restrict zeroes a tree outside the subspace: <g, restrict(D)> over the whole tree equals the inner
  product of the selected coordinates (the exact value that the projected own + others estimate); count-sketch's
  draw computed once (sketch.count_sketch_bits) and passed in gives what `project` draws itself."""
  from displacement_jax.audit import sketch  # pylint: disable=g-import-not-at-top

  s, _ = session
  leaves, treedef = jax.tree.flatten(s.params0)
  keys = jax.random.split(jax.random.key(3), 2 * len(leaves))
  g, d = (
      jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys[i::2], leaves)]) for i in (0, 1)
  )
  whole = sum(
      float(jnp.vdot(a, b))
      for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(sketch.restrict(d, "head_and_last_layers", 1)))
  )
  sel_g, sel_d = (sketch.project(sketch.select(t, "head_and_last_layers", 1), "none", 0) for t in (g, d))
  np.testing.assert_allclose(whole, float(jnp.vdot(sel_g, sel_d)), rtol=1e-5)
  assert sketch.restrict(d, "all") is d
  leaves = sketch.select(g, "all")
  bits = sketch.count_sketch_bits(leaves, 5)  # the draw computed once, passed in
  project = jax.jit(lambda x, b: sketch.project(x, "count_sketch", 100, 5, b))
  np.testing.assert_array_equal(np.asarray(project(leaves, bits)), np.asarray(project(leaves, None)))


def test_audit_demo_pairs_are_the_demos():
  """configs/audit_demo.py's data file holds the demo's 40 minimal-edit pairs (edit_pairs.rows('edit', limit=40))."""
  from configs import audit_demo  # pylint: disable=g-import-not-at-top

  with open(audit_demo.PAIRS) as f:
    stored = [json.loads(line) for line in f]
  assert stored == edit_pairs.rows("edit", limit=40)
  config = audit_demo.get_config()
  assert (config.data.path, config.optim.lr, config.audit.sketch_dim) == (audit_demo.PAIRS, 1e-6, 16384)


def test_decomposition_sums_to_the_replays_first_order(session):
  """AdamW (momentum across steps, bias correction), two epochs of 2 batches on the tiny model, no projection:
  per pair, own + others = sum_j C_ij equals the replay's first order <grad ln pi, D> (y+ and y-); the split and
  top contributors are read off the matrix."""
  from displacement_jax.audit import decompose  # pylint: disable=g-import-not-at-top

  s, dataset = session
  overrides = {"optim.name": "adamw", "optim.lr": 1e-3, "batch_size": 4, "num_epochs": 2, "audit.sketch": "none"}
  pred, info = s.audit_decomposed(dataset, overrides)
  for side, c in enumerate((info["chosen"], info["rejected"])):
    scale = np.abs(pred["first_order"][side]).max()
    np.testing.assert_allclose(c.sum(axis=1), pred["first_order"][side], atol=1e-4 * scale)
  parts = decompose.split(info["chosen"], 3)
  np.testing.assert_allclose(parts["own"] + parts["others"], info["chosen"].sum(axis=1), rtol=1e-12)
  for i, (rows, values) in enumerate(zip(parts["top_rows"], parts["top_values"])):
    negatives = sorted(v for j, v in enumerate(info["chosen"][i]) if j != i and v < 0)[:3]
    np.testing.assert_allclose(values[: len(negatives)], negatives)
    assert all(info["chosen"][i, j] == v for j, v in zip(rows, values) if j >= 0) and i not in rows
  flags = decompose.displaced_by(parts["own"], parts["others"])
  assert all((f == "none") == (o + x >= 0) for f, o, x in zip(flags, parts["own"], parts["others"]))


def test_projected_inner_products_converge_as_one_over_sqrt_k(session):
  """Per-pair gradients of ln pi(y+-) of the tiny model (jax.jacrev, on the LM head and final norm): for both
  projections the inner products are unbiased and their error falls as 1/sqrt(k): the mean squared error matches
  the variance written out, (|a|^2 |b|^2 + <a, b>^2 - 2 sum a_c^2 b_c^2) / k, and its log-log slope against k is
  -1/2. Count-sketch hashes the LM head (most of these coordinates) by row and column (sketch.OUTER_LEAVES), whose
  product signs add variance from rectangles of coordinates; on these gradients it measured 0.93-1.07 x the
  per-coordinate formula, within the same band."""
  from displacement_jax.audit import sketch  # pylint: disable=g-import-not-at-top

  s, dataset = session
  batch = s._collate(dataset.pairs[:4], dataset.pad_id, 4, packed=True)
  ref = audit.reference_model(s.loaded.model)

  @jax.jit
  def gradients(params):  # 8 vectors (y+ and y- of 4 pairs) on the subspace, stacked: leaves [8, ...]
    jac = jax.jacrev(lambda p: audit.dense_pair_logps(ref, p, batch))(params)  # leaves [2, 4, ...]
    trees = [jax.tree.map(lambda x, a=a, b=b: x[a, b], jac) for a in range(2) for b in range(4)]
    leaves = [sketch.select(t, "head_and_last_layers", 0) for t in trees]  # LM head, norm
    return jax.tree.map(lambda *x: jnp.stack(x), *leaves), jnp.stack([sketch.project(x, "none", 0) for x in leaves])

  stacked, exact_V = gradients(s.params0)
  exact_V = np.asarray(exact_V, np.float64)  # [8, d]
  exact = exact_V @ exact_V.T
  sq = exact_V**2
  var_k1 = np.outer(sq.sum(1), sq.sum(1)) + exact**2 - 2 * sq @ sq.T  # k x the variance
  norms = np.sqrt(np.outer(sq.sum(1), sq.sum(1)))
  ks, seeds, iu = (16, 64, 256), 8, np.triu_indices(8)
  rms, ratio, bias = {}, {}, {}
  for k in ks:  # both projections, all seeds and vectors in one jitted call: [seeds, 8, k] each

    @jax.jit
    def project(stacked, seed_S, k=k):
      one = lambda kind: jax.vmap(jax.vmap(lambda t, seed: sketch.project(t, kind, k, seed), (0, None)), (None, 0))
      return {kind: one(kind)(stacked, seed_S) for kind in ("count_sketch", "rademacher")}

    for kind, P in project(stacked, jnp.arange(seeds)).items():
      P = np.asarray(P, np.float64)
      errs = np.stack([((p @ p.T - exact) / norms)[iu] for p in P])  # [seeds, pairs of vectors]
      rms.setdefault(kind, []).append(np.sqrt(np.mean(errs**2)))
      ratio.setdefault(kind, []).append(np.mean(errs**2) / np.mean((var_k1 / norms**2)[iu] / k))
      per_seed = errs.mean(axis=1)  # one S per seed: its errors on the pairs of vectors are not independent
      bias.setdefault(kind, []).append(abs(per_seed.mean()) / (per_seed.std(ddof=1) / np.sqrt(seeds)))  # t-statistic
  for kind in rms:
    slope = np.polyfit(np.log(ks), np.log(rms[kind]), 1)[0]
    assert -0.62 < slope < -0.38, (kind, slope, rms[kind])
    assert all(0.5 < r < 2.0 for r in ratio[kind]), (kind, ratio[kind])
    assert all(b < 5.0 for b in bias[kind]), (kind, bias[kind])  # unbiased: |t| of the mean error over seeds


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_training_monitor_logs_the_audit_beside_the_measured_change(tmp_path, lora_rank):
  """eval.audit in train.run (configs/dpo_tiny.py, SGD at a small lr, one epoch of 3 steps): the monitor's last
  row gives per pair the audit's prediction (first order, the model at theta0 + D) beside the measured change of
  ln pi(y+), equal to first order in lr; its Spearman and sign agreement are those of the pairs it lists. With LoRA
  (r4 adapters) the monitor replays the adapters' updates on the fixed base, as training makes them (a replay of
  all parameters would predict a run that did not happen)."""
  from configs import dpo_tiny  # pylint: disable=g-import-not-at-top
  from displacement_jax.train import loop as training  # pylint: disable=g-import-not-at-top
  from displacement_jax.experiments import results  # pylint: disable=g-import-not-at-top

  config = dpo_tiny.get_config()
  config.output_dir = str(tmp_path)
  config.optim.name, config.optim.lr, config.num_steps, config.num_epochs = "sgd", 1e-3, 0, 1
  if lora_rank:
    config.model.lora.rank, config.optim.lr = lora_rank, 1e-2  # B starts at 0: a larger step to move ln pi
  config.eval.every, config.eval.audit, config.checkpoint.at_end, config.reference.cache = 0, True, False, False
  result = training.run(config)
  pairs = np.array(result.monitor["monitor/audit_pairs"])  # [row, first order, along, measured]
  assert len(pairs) == min(config.eval.max_samples, 24)
  first, along, measured = pairs[:, 1], pairs[:, 2], pairs[:, 3]
  scale = np.abs(measured).max()
  assert scale > 1e-4, scale  # the run moved the log-probs
  np.testing.assert_allclose(along, measured, atol=0.02 * scale)
  np.testing.assert_allclose(first, measured, atol=0.05 * scale)
  m = result.monitor
  assert m["monitor/audit_first_order_spearman"] == results.spearman(first, measured)
  assert m["monitor/audit_along_direction_sign_agreement"] == results.sign_agreement(along, measured)
  logged = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["monitor/audit_pairs"] for r in logged if "monitor/audit_pairs" in r][-1] == pairs.tolist()


# --- LoRA runs: the audit differentiates w.r.t. the adapters alone, on the fixed base ------------------------------


@pytest.fixture(scope="module")
def lora_session(tmp_path_factory):
  """A Session on the tiny Llama with LoRA r4 adapters from a PEFT directory (model.lora.path), B != 0: the start is
  not the base model, which stays training's reference, and both factors have gradients."""
  from displacement_jax import runtime  # pylint: disable=g-import-not-at-top
  from displacement_jax.models import peft_io  # pylint: disable=g-import-not-at-top

  config = demo_config.get_config("tiny")
  config.output_dir = str(tmp_path_factory.mktemp("audit_lora"))
  loaded = runtime.load_model(config)
  adapters = lora.init_adapters(loaded.params, 4, "all-linear", jax.random.key(5))
  adapters = jax.tree.map(lambda x, r: x + r, adapters, _random_like(adapters, jax.random.key(6), 0.05))
  config.model.lora.path = peft_io.save_adapter(
      adapters, lora.with_lora(loaded.model_config, 16.0), os.path.join(config.output_dir, "adapter")
  )
  s = short_runs.Session(config)
  return s, s.dataset(edit_pairs.rows("edit", limit=8), "edit")


def _random_like(tree, key, scale):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def test_lora_first_order_equals_autodiff_inner_product_on_the_adapters(lora_session):
  """LoRA: <d ln pi(y+-)_i / d adapters, D> by forward mode (the audit's derivatives with the base given) equals the
  inner product of jax.jacrev of the fast path (base combined with the adapters, differentiated w.r.t. the
  adapters alone) with D."""
  s, dataset = lora_session
  assert s.base is not None and jax.tree.structure(s.params0) == jax.tree.structure(lora.split(s.params0)[1])
  direction = _random_like(s.params0, jax.random.key(3), 1e-3)
  batch = s._collate(dataset.pairs[:4], dataset.pad_id, 4, packed=True)
  derivs = audit.make_directional_derivatives(s.loaded.model, order=1)
  first = np.asarray(derivs(s.params0, direction, batch, s.base))[0]

  def logps(a):
    out = forward.pair_logps(s.loaded.model, lora.combine(s.base, a), batch, 64)
    return jnp.stack([out["chosen_logps_B"], out["rejected_logps_B"]])

  jac = jax.jacrev(logps)(s.params0)  # leaves [2, P, ...], the adapters' only
  inner = sum(jnp.tensordot(j, d, axes=d.ndim) for j, d in zip(jax.tree.leaves(jac), jax.tree.leaves(direction)))
  np.testing.assert_allclose(first, np.asarray(inner), rtol=1e-4, atol=1e-6)


def test_lora_sgd_audit_predicts_the_measured_lora_step(lora_session, tmp_path):
  """LoRA from model.lora.path, SGD, one epoch (one step) at a small lr, audited with the decomposition (no
  projection): it lives on the adapters, its first order equals the measured change of train.loop.run (train.lora's
  step on the adapters, the base model its reference) to first order in lr, the model at theta0 + D is the trained
  one (so the replay took the run's reference), own + others rebuild the first order; Session.train trains the
  same adapters."""
  from displacement_jax.train import loop as training  # pylint: disable=g-import-not-at-top

  s, dataset = lora_session
  overrides = {"optim.name": "sgd", "optim.lr": 1e-3, "audit.sketch": "none"}  # 8 pairs, batch 8: one step
  start = s.logps(s.params0, dataset)
  base_model = s.logps({}, dataset)  # no adapters: the run's reference
  assert np.abs(np.stack(start) - np.stack(base_model)).max() > 0.5  # the adapters moved the start away from it
  pred, info = s.audit_decomposed(dataset, overrides, start=start)
  assert info["subspace_size"] == lora.count(s.params0)  # the adapters, nothing of the base
  run_cfg = short_run.train_run_config(s, dataset, overrides, tmp_path)
  trained = training.run(run_cfg).params  # the adapters
  changes = np.stack(s.logps(jax.device_put(trained), dataset)) - np.stack(start)
  scale = np.abs(changes).max()
  assert scale > 1e-3, scale  # the step moved the log-probs
  np.testing.assert_allclose(pred["first_order"], changes, atol=0.02 * scale)
  np.testing.assert_allclose(pred["along_direction"], changes, atol=1e-4 * scale)  # one step: theta0 + D is it
  for side, c in enumerate((info["chosen"], info["rejected"])):
    np.testing.assert_allclose(c.sum(axis=1), pred["first_order"][side], atol=1e-4 * scale)
  measured = s.train(dataset, overrides, start=start)
  np.testing.assert_allclose(np.stack([measured.chosen_change(), measured.rejected_change()]), changes, atol=1e-5)


def test_lora_decomposition_on_the_last_layers_adapters_sums_to_their_first_order(lora_session):
  """LoRA, subspace 'head_and_last_layers' (the adapters of the last layer: LoRA has none on the head or the norm),
  RMSprop, two steps, no projection: per pair own + others equals the exact first order along D restricted to those
  adapters (the JVP of `sketch.restrict(D)`), which is neither zero nor the whole first order."""
  s, dataset = lora_session
  overrides = {
      "optim.name": "rmsprop",
      "optim.lr": 1e-3,
      "batch_size": 4,
      "audit.sketch": "none",
      "audit.subspace": "head_and_last_layers",
      "audit.last_layers": 1,
  }
  pred, info = s.audit_decomposed(dataset, overrides)
  last = sketch.select(s.params0, "head_and_last_layers", 1)
  assert info["subspace_size"] == sketch.size(last) < lora.count(s.params0)
  exact = info["subspace_first_order"]
  scale = np.abs(exact).max()
  assert scale > 1e-3 and np.abs(exact - pred["first_order"]).max() > 0.05 * np.abs(pred["first_order"]).max()
  for side, c in enumerate((info["chosen"], info["rejected"])):
    np.testing.assert_allclose(c.sum(axis=1), exact[side], atol=1e-4 * scale)


def test_cli_audits_a_lora_run_on_its_adapters(tmp_path, lora_session, capsys):
  """`python -m displacement_jax.audit` on configs/dpo_tiny.py with fresh LoRA r4 adapters: a row per pair, the
  flag is the sign at theta0 + D, and what it differentiates is the adapters (r (in + out) per adapted kernel and
  layer); 'head_and_last_layers' is the adapters of the last layers. (The decomposition on adapters: above.)"""
  from displacement_jax.audit import main as audit_main  # pylint: disable=g-import-not-at-top  (an entry point)

  config_path = os.path.join(ROOT, "configs", "dpo_tiny.py")
  flags = ["--config.model.lora.rank=4", "--config.num_steps=0", "--config.audit.decompose=False"]
  assert audit_main.main(["audit", f"--config={config_path}", f"--config.output_dir={tmp_path}", *flags]) == 0
  rows = [json.loads(line) for line in open(tmp_path / audit_main.ROWS_FILE)]
  summary = json.load(open(tmp_path / audit_main.SUMMARY_FILE))
  assert summary["lora_rank"] == 4 and [r["row"] for r in rows] == list(range(summary["num_pairs"]))
  assert all(r["flag"] == (r["chosen_along_direction"] < 0) for r in rows)
  assert all(np.isfinite(r["chosen_second_order"]) and r["chosen_first_order"] != 0 for r in rows)
  base = lora_session[0].base  # the same tiny Llama
  size = sum(
      4 * n * (i + o) for n, i, o in (base["layers"][lora.MODULE_OF[t]][t]["kernel"].shape for t in lora.MODULE_OF)
  )
  assert f"trained: the LoRA adapters (r4, {size} parameters)" in capsys.readouterr().out
  last = sketch.select(lora_session[0].params0, "head_and_last_layers", 1)
  assert all(name.startswith("layers/") and x.shape[0] == 1 for name, x in last.items())
