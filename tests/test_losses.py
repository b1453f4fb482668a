"""Tests for displacement_jax.losses: hand-computed values, an independent float64 numpy formula, autodiff."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from displacement_jax import losses

# Hand example, beta = 0.1:
#   s_w = [-10, -20], s_l = [-12, -15], s_w_ref = [-11, -19.5], s_l_ref = [-11, -15.5]
#   d = [2, -5], d_ref = [0, -4], h = d - d_ref = [2, -1], beta h = [0.2, -0.1]
PC = np.array([-10.0, -20.0], np.float32)
PR = np.array([-12.0, -15.0], np.float32)
RC = np.array([-11.0, -19.5], np.float32)
RR = np.array([-11.0, -15.5], np.float32)
ARGS = (PC, PR, RC, RR)
# -log sigmoid(0.2) = log(1 + e^-0.2) = 0.598138869; -log sigmoid(-0.1) = log(1 + e^0.1) = 0.744396660
DPO = (0.5981388693815918 + 0.744396660073571) / 2  # 0.671267765
# cDPO eps = 0.1: 0.9*0.598138869 + 0.1*log(1+e^0.2) = 0.618138869; 0.9*0.744396660 + 0.1*log(1+e^-0.1) = 0.734396660
CDPO = (0.6181388693815918 + 0.734396660073571) / 2


def test_dpo_hand_values():
  np.testing.assert_allclose(losses.dpo_loss(*ARGS, beta=0.1), DPO, rtol=1e-6)
  np.testing.assert_allclose(losses.dpo_loss(*ARGS, beta=0.1, label_smoothing=0.1), CDPO, rtol=1e-6)
  # eps = 0.5 makes the loss symmetric: log(1+e^x) + log(1+e^-x) averaged = log 2 + |x|/2 + ... ; check symmetry
  sym = losses.dpo_loss(*ARGS, beta=0.1, label_smoothing=0.5)
  flipped = losses.dpo_loss(PR, PC, RR, RC, beta=0.1, label_smoothing=0.5)
  np.testing.assert_allclose(sym, flipped, rtol=1e-6)


def test_ipo_is_on_summed_logps():
  # (h - 1/(2 beta))^2 = (2 - 5)^2 = 9 and (-1 - 5)^2 = 36 -> mean 22.5 (summed log-probs, no length norm)
  np.testing.assert_allclose(losses.ipo_loss(*ARGS, beta=0.1), 22.5, rtol=1e-6)
  # beta = 0.01: 1/(2 beta) = 50 -> (2-50)^2 = 2304, (-1-50)^2 = 2601 -> 2452.5
  np.testing.assert_allclose(losses.ipo_loss(*ARGS, beta=0.01), 2452.5, rtol=1e-6)


def test_cross_entropy_slic_dpop_gpo_hand_values():
  np.testing.assert_allclose(losses.cross_entropy_loss(PC), 15.0, rtol=1e-6)
  # SLiC delta 1: max(0, 1 - 2) = 0, max(0, 1 + 5) = 6 -> 3
  np.testing.assert_allclose(losses.slic_loss(PC, PR, delta=1.0), 3.0, rtol=1e-6)
  # DPOP: penalty max(0, s_w_ref - s_w) = [0 (inactive: -11 < -10), 0.5 (active: -19.5 > -20)]
  np.testing.assert_allclose(losses.dpop_loss(*ARGS, beta=0.1, dpop_lambda=50.0), DPO + 50.0 * 0.25, rtol=1e-6)
  np.testing.assert_allclose(losses.dpop_loss(*ARGS, beta=0.1, dpop_lambda=0.0), DPO, rtol=1e-6)
  # policy above the reference on every sample: the penalty is inactive and DPOP == DPO
  np.testing.assert_allclose(
      losses.dpop_loss(PC + 1, PR + 1, RC, RR, beta=0.1, dpop_lambda=50.0),
      losses.dpo_loss(PC + 1, PR + 1, RC, RR, beta=0.1),
      rtol=1e-6,
  )
  gpo = functools.partial(losses.gpo_loss, *ARGS, beta=0.1)
  np.testing.assert_allclose(gpo(fn="logistic"), DPO, rtol=1e-6)
  np.testing.assert_allclose(gpo(fn="hinge"), (0.8 + 1.1) / 2, rtol=1e-6)  # max(0, 1 - x)
  np.testing.assert_allclose(gpo(fn="squared"), (0.64 + 1.21) / 2, rtol=1e-6)  # (x - 1)^2
  np.testing.assert_allclose(gpo(fn="truncated_quadratic"), (0.64 + 1.21) / 2, rtol=1e-6)
  np.testing.assert_allclose(gpo(fn="exponential"), 0.9619508355768147, rtol=1e-6)  # (e^-0.2 + e^0.1)/2
  np.testing.assert_allclose(gpo(fn="savage"), 0.23912628863085514, rtol=1e-6)  # sigmoid(-x)^2


def _np_reference(objective, pc, pr, rc, rr, beta, eps, delta, lam, fn):
  pc, pr, rc, rr = (np.asarray(a, np.float64) for a in (pc, pr, rc, rr))
  d, h = pc - pr, (pc - pr) - (rc - rr)
  nls = lambda x: np.logaddexp(0.0, -x)  # -log sigmoid(x)
  dpo = (1 - eps) * nls(beta * h) + eps * nls(-beta * h)
  x = beta * h
  gpo = {
      "logistic": nls(x),
      "hinge": np.maximum(0, 1 - x),
      "squared": (x - 1) ** 2,
      "exponential": np.exp(-x),
      "truncated_quadratic": np.maximum(0, 1 - x) ** 2,
      "savage": 1 / (1 + np.exp(x)) ** 2,
  }
  return {
      "dpo": dpo,
      "ipo": (h - 1 / (2 * beta)) ** 2,
      "cross_entropy": -pc,
      "slic": np.maximum(0, delta - d),
      "dpop": dpo + lam * np.maximum(0, rc - pc),
      "gpo": gpo[fn],
  }[objective]


@pytest.mark.parametrize(
    "objective,fn",
    [(o, "logistic") for o in losses.OBJECTIVES]
    + [("gpo", f) for f in ("hinge", "squared", "exponential", "truncated_quadratic", "savage")],
)
def test_vs_independent_numpy_formula(objective, fn):
  rng = np.random.default_rng(1)
  pc, pr, rc, rr = (rng.normal(-30, 8, size=16).astype(np.float32) for _ in range(4))
  kw = dict(beta=0.2, label_smoothing=0.15, slic_delta=2.0, dpop_lambda=5.0, gpo_fn=fn)
  expected_B = _np_reference(objective, pc, pr, rc, rr, 0.2, 0.15, 2.0, 5.0, fn)
  np.testing.assert_allclose(losses.per_example_loss(objective, pc, pr, rc, rr, **kw), expected_B, rtol=1e-4, atol=1e-5)
  loss, _ = losses.preference_loss(objective, pc, pr, rc, rr, sft_coeff=0.3, **kw)
  np.testing.assert_allclose(loss, expected_B.mean() + 0.3 * (-pc.astype(np.float64).mean()), rtol=1e-4)


def test_preference_loss_sft_and_metrics():
  loss, metrics = losses.preference_loss("dpo", *ARGS, beta=0.1, sft_coeff=0.5)
  np.testing.assert_allclose(loss, DPO + 0.5 * 15.0, rtol=1e-6)
  expected = {
      "rewards/chosen": 0.1 * (1.0 - 0.5) / 2,  # beta * mean(s_w - s_w_ref) = 0.025
      "rewards/rejected": 0.1 * (-1.0 + 0.5) / 2,  # -0.025
      "rewards/margins": 0.05,
      "rewards/accuracies": 0.5,  # [0.1 > -0.1, -0.05 > 0.05]
      "logps/chosen": -15.0,
      "logps/rejected": -13.5,
      "logps/chosen_change": 0.25,
      "logps/rejected_change": -0.25,
      "loss/sft": 15.0,
      "loss": DPO + 7.5,
  }
  assert set(metrics) == set(expected)
  for k, v in expected.items():
    np.testing.assert_allclose(metrics[k], v, rtol=1e-5, atol=1e-7, err_msg=k)
  loss0, metrics0 = losses.preference_loss("dpo", *ARGS, beta=0.1)
  np.testing.assert_allclose(loss0, DPO, rtol=1e-6)
  assert "loss/sft" not in metrics0
  # reference-free objectives accept None references; reward metrics are then omitted
  loss_ce, metrics_ce = losses.preference_loss("cross_entropy", PC, PR, None, None, beta=0.1)
  np.testing.assert_allclose(loss_ce, 15.0, rtol=1e-6)
  assert set(metrics_ce) == {"logps/chosen", "logps/rejected", "loss"}


def test_jit_and_traced_beta():
  f = jax.jit(lambda beta, *a: losses.preference_loss("dpo", *a, beta=beta, sft_coeff=0.5)[0])
  np.testing.assert_allclose(f(0.1, *ARGS), DPO + 7.5, rtol=1e-6)
  per_row = jax.vmap(lambda *a: losses.per_example_loss("ipo", *(x[None] for x in a), beta=0.1)[0])
  np.testing.assert_allclose(per_row(*ARGS), [9.0, 36.0], rtol=1e-6)


OBJECTIVE_CASES = [(o, "logistic") for o in losses.OBJECTIVES] + [
    ("gpo", f) for f in ("hinge", "squared", "truncated_quadratic", "savage")
]


@pytest.mark.parametrize("objective,fn", OBJECTIVE_CASES)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_gradients_finite_at_extreme_margins(objective, fn, sign):
  pc = jnp.array([0.0, -5.0])
  pr = pc - sign * 1e4  # |d| = 1e4 (and |h| = 1e4 with zero reference margin)
  rc = rr = jnp.array([-3.0, -3.0])
  loss_fn = lambda *a: losses.preference_loss(objective, *a, beta=0.1, sft_coeff=0.1, gpo_fn=fn)[0]
  loss = loss_fn(pc, pr, rc, rr)
  grads = jax.grad(loss_fn, argnums=(0, 1))(pc, pr, rc, rr)
  assert np.isfinite(loss) and all(np.all(np.isfinite(g)) for g in grads)
  if objective != "cross_entropy":
    deriv = losses.loss_derivative(objective, pc - pr, beta=0.1, ref_margin=rc - rr, gpo_fn=fn)
    assert np.all(np.isfinite(deriv))
  if objective == "dpo":  # saturated sigmoid: gradient ~0 when winning, exactly beta/B when losing badly
    np.testing.assert_allclose(grads[1], 0.0 if sign > 0 else 0.1 / 2, atol=1e-7)  # dL/ds_l = -l'/B


@pytest.mark.parametrize(
    "objective,fn", [c for c in OBJECTIVE_CASES if c[0] != "cross_entropy"] + [("gpo", "exponential")]
)
def test_loss_derivative_matches_autodiff(objective, fn):
  rng = np.random.default_rng(2)
  pc, pr, rc, rr = (jnp.asarray(rng.normal(-20, 6, size=8), jnp.float32) for _ in range(4))
  kw = dict(beta=0.3, label_smoothing=0.2, slic_delta=1.5, gpo_fn=fn)
  # d loss_i / d s_l,i = -l'(d_i) for every margin-based objective (the DPOP penalty does not involve s_l)
  grad_pr = jax.grad(lambda pr: jnp.sum(losses.per_example_loss(objective, pc, pr, rc, rr, **kw)))(pr)
  deriv = losses.loss_derivative(objective, pc - pr, ref_margin=rc - rr, **kw)
  np.testing.assert_allclose(deriv, -grad_pr, rtol=1e-5, atol=1e-6)


def test_loss_derivative_hand_values():
  # DPO beta 0.1: l'(h) = -beta sigmoid(-beta h): h = 2 -> -0.1 sigmoid(-0.2) = -0.0450166
  np.testing.assert_allclose(
      losses.loss_derivative("dpo", jnp.array([2.0, -1.0]), beta=0.1),
      [-0.04501660026875222, -0.052497918747894],
      rtol=1e-6,
  )
  np.testing.assert_allclose(
      losses.loss_derivative("dpo", 5.0, beta=0.1, ref_margin=3.0), -0.04501660026875222, rtol=1e-6
  )
  np.testing.assert_allclose(losses.loss_derivative("ipo", 2.0, beta=0.1), 2 * (2 - 5), rtol=1e-6)
  np.testing.assert_allclose(losses.loss_derivative("slic", jnp.array([0.5, 2.0]), beta=0.1), [-1.0, 0.0])
  with pytest.raises(ValueError, match="'cross_entropy'.*not a function of the margin"):
    losses.loss_derivative("cross_entropy", 1.0, beta=0.1)


def test_bad_inputs():
  with pytest.raises(
      ValueError, match=r"unknown objective 'kto'; valid objectives: dpo, ipo, cross_entropy, " r"slic, dpop, gpo"
  ):
    losses.preference_loss("kto", *ARGS, beta=0.1)
  with pytest.raises(ValueError, match=r"unknown objective"):
    losses.loss_derivative("orpo", 1.0, beta=0.1)
  with pytest.raises(ValueError, match=r"ref_chosen_logps .*\(3,\).* must have the shape of policy_chosen_logps"):
    losses.dpo_loss(PC, PR, np.zeros(3, np.float32), RR, beta=0.1)
  with pytest.raises(ValueError, match=r"policy_rejected_logps must have rank 1.*\(2, 1\)"):
    losses.dpo_loss(PC, PR[:, None], RC, RR, beta=0.1)
  with pytest.raises(ValueError, match=r"policy_chosen_logps must be a floating array.*int32"):
    losses.ipo_loss(PC.astype(np.int32), PR, RC, RR, beta=0.1)
  with pytest.raises(ValueError, match=r"ref_rejected_logps is required"):
    losses.preference_loss("dpo", PC, PR, RC, None, beta=0.1)
  with pytest.raises(ValueError, match=r"beta must be > 0, got 0"):
    losses.ipo_loss(*ARGS, beta=0.0)
  with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\], got 0.7"):
    losses.dpo_loss(*ARGS, beta=0.1, label_smoothing=0.7)
  with pytest.raises(ValueError, match=r"gpo_fn must be one of .*'hinge'.*got 'cubic'"):
    losses.gpo_loss(*ARGS, beta=0.1, fn="cubic")
