"""Theory module: every theorem's rate equals the autodiff rate (jvp of ln pi along -grad loss), in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from displacement_jax import ches, theory

BETA = 0.1
SIZES = [(5, 3, 0), (12, 8, 1), (30, 16, 2)]  # (V, D, seed)
RTOL = 1e-5


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


def _loss_and_derivative(loss: str, d, d_ref):
  """Scalar function l(d) of the margin and its closed-form derivative (float64, independent of the module)."""
  h = d - d_ref
  if loss == "dpo":
    return -jax.nn.log_sigmoid(BETA * h), -BETA * jax.nn.sigmoid(-BETA * h)
  return (h - 1.0 / (2 * BETA)) ** 2, 2.0 * (h - 1.0 / (2 * BETA))


def _autodiff_rate(target_fn, loss_fn, params):
  """d/dt target(params) along gradient flow d params/dt = -grad loss(params)."""

  def rate(params):
    tangent = jax.tree_util.tree_map(jnp.negative, jax.grad(loss_fn)(params))
    return jax.jvp(target_fn, (params,), (tangent,))[1]

  return jax.jit(rate)(params)


def _random(V, D, seed, scale=1.0):
  rng = np.random.default_rng(seed)
  W = jnp.asarray(rng.normal(size=(V, D)) * scale)
  h = jnp.asarray(rng.normal(size=(D,)))
  return W, h, rng


def _logp(params):
  W, h = params
  return jax.nn.log_softmax(W @ h)


def _np_softmax(logits):
  z = np.exp(logits - logits.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def _rel(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


# ------------------------------------------------------------------------------------------------ Thm 1 / 2


@pytest.mark.parametrize("loss", ["dpo", "ipo"])
@pytest.mark.parametrize("V,D,seed", SIZES)
def test_theorem1_and_2_match_autodiff(loss, V, D, seed):
  W, h, rng = _random(V, D, seed)
  y_pos, y_neg = (int(t) for t in rng.choice(V, 2, replace=False))
  d_ref = 0.3
  margin = lambda p: _logp(p)[y_pos] - _logp(p)[y_neg]
  loss_fn = lambda p: _loss_and_derivative(loss, margin(p), d_ref)[0]
  lp = jax.jit(lambda p: _loss_and_derivative(loss, margin(p), d_ref)[1])((W, h))
  ref_V = _autodiff_rate(_logp, loss_fn, (W, h))
  assert theory.logprob_rate(W, h, y_pos, y_neg, loss_derivative=lp).dtype == jnp.float64
  np.testing.assert_allclose(theory.logprob_rate(W, h, y_pos, y_neg, loss_derivative=lp), ref_V[y_pos], rtol=RTOL)
  np.testing.assert_allclose(
      theory.logprob_rate(W, h, y_pos, y_neg, loss_derivative=lp, dispreferred=True), ref_V[y_neg], rtol=RTOL
  )
  rates_V = theory.token_rates(W, h, y_pos, y_neg, loss_derivative=lp)
  assert rates_V.shape == (V,)
  assert _rel(rates_V, ref_V) < RTOL
  # jit-able with traced token ids
  jitted = jax.jit(lambda W, h, a, b: theory.token_rates(W, h, a, b, loss_derivative=lp))
  assert _rel(jitted(W, h, y_pos, y_neg), ref_V) < RTOL


def test_default_loss_derivative_is_rate_per_unit_minus_l():
  W, h, _ = _random(7, 4, 3)
  np.testing.assert_allclose(
      theory.logprob_rate(W, h, 1, 2) * 0.05, theory.logprob_rate(W, h, 1, 2, loss_derivative=-0.05), rtol=1e-12
  )


# ------------------------------------------------------------------------------------------------ Thm 3


def _multi_token_setup(V, D, K, Kn, seed):
  rng = np.random.default_rng(seed)
  W, h_x = rng.normal(size=(V, D)), rng.normal(size=(D,))
  rest_pos, rest_neg = rng.normal(size=(K - 1, D)), rng.normal(size=(Kn - 1, D))
  y_pos = rng.integers(0, V, K)
  y_neg = rng.integers(0, V, Kn)
  y_neg[0] = (y_pos[0] + 1 + rng.integers(0, V - 1)) % V
  return W, h_x, rest_pos, rest_neg, y_pos, y_neg


def _seq_logp(W, H_KD, y_K):
  return jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(H_KD @ W.T, axis=-1), y_K[:, None], 1))


@pytest.mark.parametrize("loss", ["dpo", "ipo"])
@pytest.mark.parametrize("V,D,K,Kn,seed", [(15, 8, 4, 5, 1), (9, 5, 1, 3, 2)])
def test_theorem3_multi_token_matches_autodiff(loss, V, D, K, Kn, seed):
  W, h_x, rest_pos, rest_neg, y_pos, y_neg = _multi_token_setup(V, D, K, Kn, seed)
  stack = lambda h, rest: jnp.concatenate([h[None], rest], 0)

  def logps(params):  # trainable: W, h_x (shared first prefix), every other prefix state
    W, h, rp, rn = params
    return _seq_logp(W, stack(h, rp), y_pos), _seq_logp(W, stack(h, rn), y_neg)

  d_ref = -0.2
  params = (W, h_x, rest_pos, rest_neg)
  loss_fn = lambda p: _loss_and_derivative(loss, logps(p)[0] - logps(p)[1], d_ref)[0]
  lp = jax.jit(lambda p: _loss_and_derivative(loss, logps(p)[0] - logps(p)[1], d_ref)[1])(params)
  H_pos, H_neg = np.concatenate([h_x[None], rest_pos]), np.concatenate([h_x[None], rest_neg])
  got_pos = theory.multi_token_logprob_rate(W, H_pos, H_neg, y_pos, y_neg, loss_derivative=lp)
  got_neg = theory.multi_token_logprob_rate(W, H_pos, H_neg, y_pos, y_neg, loss_derivative=lp, dispreferred=True)
  np.testing.assert_allclose(got_pos, _autodiff_rate(lambda p: logps(p)[0], loss_fn, params), rtol=RTOL)
  np.testing.assert_allclose(got_neg, _autodiff_rate(lambda p: logps(p)[1], loss_fn, params), rtol=RTOL)


def test_theorem3_alphas_reduce_to_theorem1_and_ches():
  W, h_x, rest_pos, rest_neg, y_pos, y_neg = _multi_token_setup(10, 6, 3, 4, 7)
  # K = K' = 1: Theorem 3 is Theorem 1
  np.testing.assert_allclose(
      theory.multi_token_logprob_rate(W, h_x[None], h_x[None], y_pos[:1], y_neg[:1], loss_derivative=-0.05),
      theory.logprob_rate(W, h_x, int(y_pos[0]), int(y_neg[0]), loss_derivative=-0.05),
      rtol=1e-10,
  )
  H_pos, H_neg = np.concatenate([h_x[None], rest_pos]), np.concatenate([h_x[None], rest_neg])
  a_pos, a_neg = theory.alpha_coefficients(W, H_pos, H_neg, y_pos, y_neg)
  p_pos, p_neg = _np_softmax(H_pos @ W.T), _np_softmax(H_neg @ W.T)
  e = lambda t: np.eye(10)[int(t)]
  np.testing.assert_allclose(a_neg[1, 2], (e(y_pos[1]) - p_pos[1]) @ (e(y_neg[2]) - p_neg[2]), rtol=1e-12)
  np.testing.assert_allclose(a_pos[2, 0], (e(y_pos[2]) - p_pos[2]) @ (e(y_pos[0]) - p_pos[0]), rtol=1e-12)
  # every a = 1: the h-inner-product part is -CHES (ches module, float32)
  ones = theory.alpha_weighted_inner(H_pos, H_neg, np.ones(a_pos.shape), np.ones(a_neg.shape))
  ches_1 = ches.ches_scores(
      jnp.asarray(H_pos[None], jnp.float32),
      jnp.asarray(H_neg[None], jnp.float32),
      jnp.ones((1, 3), bool),
      jnp.ones((1, 4), bool),
  )
  np.testing.assert_allclose(-ones, ches_1[0], rtol=1e-5)
  sp, sn = np.asarray(H_pos).sum(0), np.asarray(H_neg).sum(0)
  np.testing.assert_allclose(-ones, sp @ sn - sp @ sp, rtol=1e-12)


# ------------------------------------------------------------------------------------------------ Thm 8/9


@pytest.mark.parametrize("loss", ["dpo", "ipo"])
@pytest.mark.parametrize("V,D,N,seed", [(6, 4, 4, 0)])
def test_theorem8_9_multi_sample_matches_autodiff(loss, V, D, N, seed):
  rng = np.random.default_rng(seed)
  W, H = rng.normal(size=(V, D)), rng.normal(size=(N, D))
  y_pos = rng.integers(0, 3, N)  # few distinct tokens so the indicator terms of a[x, x~] fire
  y_neg = (y_pos + 1 + rng.integers(0, 2, N)) % 3
  y_pos[1], y_neg[1] = y_neg[0], y_pos[0]
  d_ref = jnp.asarray(rng.normal(size=N) * 0.3)
  rows = jnp.arange(N)

  def margins(params):
    logp = jax.nn.log_softmax(params[1] @ params[0].T, -1)
    return logp, logp[rows, y_pos] - logp[rows, y_neg]

  loss_fn = lambda p: jnp.mean(_loss_and_derivative(loss, margins(p)[1], d_ref)[0])
  lp_N = jax.jit(lambda p: _loss_and_derivative(loss, margins(p)[1], d_ref)[1])((W, H))
  ref_NV = _autodiff_rate(lambda p: margins(p)[0], loss_fn, (W, H))
  got_pos = theory.multi_sample_logprob_rate(W, H, y_pos, y_neg, loss_derivative=lp_N)
  got_neg = theory.multi_sample_logprob_rate(W, H, y_pos, y_neg, loss_derivative=lp_N, dispreferred=True)
  assert got_pos.shape == (N,)
  assert _rel(got_pos, ref_NV[rows, y_pos]) < RTOL
  assert _rel(got_neg, ref_NV[rows, y_neg]) < RTOL
  a = theory.cross_sample_coefficients(W, H, y_pos, y_neg)
  p1 = _np_softmax(np.asarray(W) @ np.asarray(H[1]))
  np.testing.assert_allclose(a[1, 0], 0.0 - 1.0 + p1[y_neg[0]] - p1[y_pos[0]], rtol=1e-12)  # y+_1 = y-_0


# ------------------------------------------------------------------------------------------------ Prop 1


@pytest.mark.parametrize("loss", ["dpo", "ipo"])
@pytest.mark.parametrize("V,D,seed", SIZES[1:2])
def test_proposition1_sft_term_matches_autodiff(loss, V, D, seed):
  W, h, rng = _random(V, D, seed + 10)
  y_pos, y_neg = (int(t) for t in rng.choice(V, 2, replace=False))
  lam = 0.7
  margin = lambda p: _logp(p)[y_pos] - _logp(p)[y_neg]
  loss_fn = lambda p: _loss_and_derivative(loss, margin(p), 0.0)[0] - lam * _logp(p)[y_pos]
  lp = jax.jit(lambda p: _loss_and_derivative(loss, margin(p), 0.0)[1])((W, h))
  ref = _autodiff_rate(lambda p: _logp(p)[y_pos], loss_fn, (W, h))
  np.testing.assert_allclose(
      theory.sft_logprob_rate(W, h, y_pos, y_neg, loss_derivative=lp, sft_coeff=lam), ref, rtol=RTOL
  )
  g = jax.jit(jax.grad(lambda p: _logp(p)[y_pos]))((W, h))
  np.testing.assert_allclose(theory.grad_sq_norm(W, h, y_pos), jnp.sum(g[0] ** 2) + jnp.sum(g[1] ** 2), rtol=1e-10)


# ------------------------------------------------------------------------------------------------ simulation


def _displacement_case():
  """W+ and W- aligned, ||W-|| = 2 ||W+|| large vs ||h||: Theorem 1 predicts ln pi(y+) falls."""
  rng = np.random.default_rng(0)
  V, D = 8, 6
  W = rng.normal(size=(V, D)) * 0.3
  v = np.zeros(D)
  v[0] = 1.0
  W[0], W[1] = 2.0 * v, 4.0 * v
  h = np.zeros(D)
  h[1:] = rng.normal(size=D - 1) * 0.3  # h orthogonal to v: p+ ~ p- ~ 1/V
  return jnp.asarray(W), jnp.asarray(h)


def _no_displacement_case():
  rng = np.random.default_rng(1)
  V, D = 8, 6
  W = rng.normal(size=(V, D)) * 0.3
  W[0], W[1] = 0.0, 0.0
  W[0, 0], W[1, 1] = 2.0, 2.0  # orthogonal unembeddings
  return jnp.asarray(W), jnp.asarray(rng.normal(size=D) * 0.3)


@pytest.mark.parametrize("loss", ["dpo", "ipo"])
@pytest.mark.parametrize("case,expect_drop", [(_displacement_case, True), (_no_displacement_case, False)])
def test_simulation_sign_predicted_by_theorem1(loss, case, expect_drop):
  W, h = case()
  rate = float(theory.logprob_rate(W, h, 0, 1))  # sign of -l' [..] with l' < 0 at init for both losses
  lr, steps = (0.5, 40) if loss == "dpo" else (0.002, 40)
  traj = theory.simulate_gradient_flow(loss, W, h, (0, 1), lr=lr, steps=steps, record_every=10)
  assert traj.logp_TNV.shape == (5, 1, 8) and traj.steps_T.tolist() == [0, 10, 20, 30, 40]
  assert traj.loss_T[-1] < traj.loss_T[0]  # training works ...
  change = traj.logp_TNV[-1, 0, 0] - traj.logp_TNV[0, 0, 0]
  assert (rate < 0) == expect_drop and (change < 0) == expect_drop, (rate, change)  # ... and the sign is predicted
  assert np.all(np.diff(traj.logp_TNV[:, 0, 0] - traj.logp_TNV[:, 0, 1]) >= -1e-12)  # the margin never shrinks


def test_simulation_first_step_matches_rates_and_multi_sample():
  rng = np.random.default_rng(5)
  W, H = jnp.asarray(rng.normal(size=(9, 5))), jnp.asarray(rng.normal(size=(3, 5)))
  samples = np.array([[0, 1], [2, 0], [3, 4]])
  lr = 1e-4
  traj = theory.simulate_gradient_flow("dpo", W, H, samples, lr=lr, steps=1, sft_coeff=0.3)
  obs_N = (traj.logp_TNV[1, np.arange(3), samples[:, 0]] - traj.logp_TNV[0, np.arange(3), samples[:, 0]]) / lr
  lp = -BETA * 0.5  # DPO at the reference point: l' = -beta sigmoid(0)
  pred_N = theory.multi_sample_logprob_rate(W, H, samples[:, 0], samples[:, 1], loss_derivative=lp)
  # the pure-DPO run follows Theorems 8/9; with sft_coeff the SFT term must change the rates
  traj0 = theory.simulate_gradient_flow("dpo", W, H, samples, lr=lr, steps=1)
  obs0_N = (traj0.logp_TNV[1, np.arange(3), samples[:, 0]] - traj0.logp_TNV[0, np.arange(3), samples[:, 0]]) / lr
  np.testing.assert_allclose(obs0_N, pred_N, rtol=2e-3)
  assert not np.allclose(obs_N, obs0_N)
  one = theory.simulate_gradient_flow("dpo", W, H[0], (0, 1), lr=lr, steps=1, sft_coeff=0.3)
  np.testing.assert_allclose(
      (one.logp_TNV[1, 0, 0] - one.logp_TNV[0, 0, 0]) / lr,
      theory.sft_logprob_rate(W, H[0], 0, 1, loss_derivative=lp, sft_coeff=0.3),
      rtol=2e-3,
  )


def test_rank_gainers_matches_simulation():
  W, h, _ = _random(40, 12, 4, scale=0.8)
  y_pos, y_neg = 3, 17
  k = 5
  pred = theory.rank_gainers(W, h, y_pos, y_neg, k)
  assert pred.shape == (k,) and y_pos not in pred and y_neg not in pred
  traj = theory.simulate_gradient_flow("dpo", W, h, (y_pos, y_neg), lr=0.2, steps=20, record_every=20)
  gain = traj.logp_TNV[-1, 0] - traj.logp_TNV[0, 0]
  gain[[y_pos, y_neg]] = -np.inf
  observed = np.argsort(-gain)[:k]
  assert len(set(pred.tolist()) & set(observed.tolist())) >= k - 1, (pred, observed)
  assert pred[0] == observed[0]
  full = theory.rank_gainers(W, h, y_pos, y_neg, k, return_rates=True)
  np.testing.assert_array_equal(full.ids, pred)
  assert np.all(np.diff(full.rates) <= 0)
  np.testing.assert_allclose(full.rates, np.asarray(theory.token_rates(W, h, y_pos, y_neg))[pred], rtol=1e-12)

  class Tok:

    def convert_ids_to_tokens(self, ids):
      return [f"tok{i}" for i in ids]

  assert theory.rank_gainers(W, h, y_pos, y_neg, 2, tokenizer=Tok()).names == tuple(f"tok{i}" for i in pred[:2])


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_input_raises_clear_value_error():
  W, h, _ = _random(6, 4, 0)
  with pytest.raises(ValueError, match=r"h must be \[4\].*shape \(5,\)"):
    theory.logprob_rate(W, jnp.ones(5), 0, 1)
  with pytest.raises(ValueError, match=r"W must be \[V, D\]"):
    theory.token_rates(jnp.ones(6), h, 0, 1)
  with pytest.raises(ValueError, match=r"y_neg=6 is out of range.*V=6"):
    theory.logprob_rate(W, h, 0, 6)
  with pytest.raises(ValueError, match=r"y_pos=-1 is out of range"):
    theory.token_rates(W, h, -1, 2)
  with pytest.raises(ValueError, match="y_pos and y_neg must differ, both are 2"):
    theory.rank_gainers(W, h, 2, 2)
  with pytest.raises(ValueError, match="k must be an integer"):
    theory.rank_gainers(W, h, 0, 1, 5)
  H = jnp.ones((3, 4))
  with pytest.raises(ValueError, match=r"y_pos_K must be \[3\]"):
    theory.multi_token_logprob_rate(W, H, H, jnp.array([0, 1]), jnp.array([1, 1, 1]))
  with pytest.raises(ValueError, match=r"y_pos_K\[0\] != y_neg_K\[0\]"):
    theory.multi_token_logprob_rate(W, H, H, jnp.array([0, 1, 2]), jnp.array([0, 1, 1]))
  with pytest.raises(ValueError, match=r"H_pos_KD\[0\] and H_neg_KD\[0\]"):
    theory.multi_token_logprob_rate(W, H, H.at[0, 0].set(2.0), jnp.array([0, 1, 2]), jnp.array([1, 1, 1]))
  with pytest.raises(ValueError, match=r"H_neg_KD must be \[N, 4\]"):
    theory.alpha_coefficients(W, H, jnp.ones((3, 5)), jnp.array([0, 1, 2]), jnp.array([1, 1, 1]))
  with pytest.raises(ValueError, match="sample 1 has both = 3"):
    theory.multi_sample_logprob_rate(W, jnp.ones((2, 4)), jnp.array([0, 3]), jnp.array([1, 3]))
  with pytest.raises(ValueError, match=r"loss_derivative must be a scalar or \[N=2\]"):
    theory.multi_sample_logprob_rate(
        W, jnp.ones((2, 4)), jnp.array([0, 3]), jnp.array([1, 2]), loss_derivative=jnp.ones(3)
    )
  with pytest.raises(ValueError, match=r"samples must be N=1 .*shape \[1, 2\]"):
    theory.simulate_gradient_flow("dpo", W, h, [0, 1, 2], lr=0.1, steps=2)
  with pytest.raises(ValueError, match="loss must be one of"):
    theory.simulate_gradient_flow("cross_entropy", W, h, (0, 1), lr=0.1, steps=2)
  with pytest.raises(ValueError, match="y_pos_N and y_neg_N must differ"):
    theory.simulate_gradient_flow("dpo", W, h, (1, 1), lr=0.1, steps=2)
