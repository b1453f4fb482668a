"""Preference objectives on summed sequence log-probs: DPO (+cDPO), IPO, cross-entropy, SLiC, DPOP, GPO.

Notation (paper-notes.md): s_w / s_l = summed log-probs of the preferred / dispreferred response under the
policy, s_w_ref / s_l_ref under the frozen reference, d = s_w - s_l, d_ref = s_w_ref - s_l_ref, h = d - d_ref.

  dpo            -(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h)    (eps = label_smoothing: cDPO)
  ipo            (h - 1/(2 beta))^2                                        (SUMMED log-probs, not averaged)
  cross_entropy  -s_w
  slic           max(0, delta - d)                                         (no reference, no beta)
  dpop           dpo + lambda max(0, s_w_ref - s_w)
  gpo            f(beta h), f in GPO_FUNCTIONS

Every `*_loss` returns the batch mean (float32 scalar); `per_example_loss` returns the [B] values.
Everything is computed in float32 through log_sigmoid / softplus, so losses and gradients stay finite at
|h| = 1e4 (except GPO 'exponential', whose exp(-beta h) genuinely overflows float32 for beta h < -88).
`loss_derivative` gives l'(d): the derivative of the per-sample loss w.r.t. d = ln p(y+) - ln p(y-), the
quantity the theory module (unconstrained-features model) multiplies its kernels by.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from displacement_jax.errors import check_array, describe

OBJECTIVES = ("dpo", "ipo", "cross_entropy", "slic", "dpop", "gpo")
# Objectives whose loss does not involve the reference log-probs (refs may be None for them).
REFERENCE_FREE = ("cross_entropy", "slic")


def _sigmoid_sq(x):
  return jnp.exp(2.0 * jax.nn.log_sigmoid(x))


# GPO convex (savage: non-convex, bounded) functions f(x) of x = beta * h, and their derivatives f'(x).
GPO_FUNCTIONS: dict[str, tuple[Callable[[jax.Array], jax.Array], Callable[[jax.Array], jax.Array]]] = {
    "logistic": (lambda x: jax.nn.softplus(-x), lambda x: -jax.nn.sigmoid(-x)),  # = DPO
    "hinge": (lambda x: jax.nn.relu(1.0 - x), lambda x: -(x < 1.0).astype(x.dtype)),  # = SLiC on h
    "squared": (lambda x: (x - 1.0) ** 2, lambda x: 2.0 * (x - 1.0)),  # IPO-like
    "exponential": (lambda x: jnp.exp(-x), lambda x: -jnp.exp(-x)),
    "truncated_quadratic": (lambda x: jax.nn.relu(1.0 - x) ** 2, lambda x: -2.0 * jax.nn.relu(1.0 - x)),
    "savage": (lambda x: _sigmoid_sq(-x), lambda x: -2.0 * _sigmoid_sq(-x) * jax.nn.sigmoid(x)),  # 1 / (1 + e^x)^2
}


def _check_logps(**logps) -> list[jax.Array]:
  """Each argument a rank-1 float array of one common shape [B]; returns them as float32."""
  out, shape0 = [], None
  for name, x in logps.items():
    if x is None:
      raise ValueError(f"{name} is required for this objective, got None")
    x = x if hasattr(x, "dtype") else np.asarray(x)
    check_array(name, x, rank=1, kind="floating")
    if shape0 is None:
      shape0 = (name, x)
    elif x.shape != shape0[1].shape:
      raise ValueError(f"{name} ({describe(x)}) must have the shape of {shape0[0]} ({describe(shape0[1])})")
    out.append(jnp.asarray(x).astype(jnp.float32))
  return out


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _check_beta(beta) -> None:
  if _is_concrete(beta) and not float(beta) > 0:
    raise ValueError(f"beta must be > 0, got {beta}")


def _check_label_smoothing(eps) -> None:
  if _is_concrete(eps) and not 0.0 <= float(eps) <= 0.5:
    raise ValueError(f"label_smoothing must be in [0, 0.5], got {eps}")


def _check_gpo_fn(fn: str) -> None:
  if fn not in GPO_FUNCTIONS:
    raise ValueError(f"gpo_fn must be one of {sorted(GPO_FUNCTIONS)}, got {fn!r}")


def _dpo_per_example(h, beta, label_smoothing):
  return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h) - label_smoothing * jax.nn.log_sigmoid(-beta * h)


def dpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> jax.Array:
  """mean[-(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h)], h = d - d_ref (eps > 0: cDPO)."""
  return jnp.mean(
      per_example_loss(
          "dpo",
          policy_chosen_logps,
          policy_rejected_logps,
          ref_chosen_logps,
          ref_rejected_logps,
          beta=beta,
          label_smoothing=label_smoothing,
      )
  )


def ipo_loss(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float
) -> jax.Array:
  """mean[(d - d_ref - 1/(2 beta))^2] on SUMMED log-probs."""
  return jnp.mean(
      per_example_loss(
          "ipo", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=beta
      )
  )


def cross_entropy_loss(policy_chosen_logps) -> jax.Array:
  """-mean s_w (supervised fine-tuning on the preferred responses)."""
  (s_w,) = _check_logps(policy_chosen_logps=policy_chosen_logps)
  return -jnp.mean(s_w)


def slic_loss(policy_chosen_logps, policy_rejected_logps, *, delta: float = 1.0) -> jax.Array:
  """mean[max(0, delta - (s_w - s_l))] (SLiC-HF calibration loss)."""
  return jnp.mean(
      per_example_loss("slic", policy_chosen_logps, policy_rejected_logps, None, None, beta=1.0, slic_delta=delta)
  )


def dpop_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta: float,
    dpop_lambda: float = 50.0,
    label_smoothing: float = 0.0,
) -> jax.Array:
  """DPO + lambda * mean[max(0, s_w_ref - s_w)] (DPO-Positive, Pal et al. 2024)."""
  return jnp.mean(
      per_example_loss(
          "dpop",
          policy_chosen_logps,
          policy_rejected_logps,
          ref_chosen_logps,
          ref_rejected_logps,
          beta=beta,
          dpop_lambda=dpop_lambda,
          label_smoothing=label_smoothing,
      )
  )


def gpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta: float,
    fn: str = "logistic",
) -> jax.Array:
  """mean[f(beta (d - d_ref))] for f = GPO_FUNCTIONS[fn] (Tang et al. 2024, Generalized Preference Opt.)."""
  return jnp.mean(
      per_example_loss(
          "gpo", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=beta, gpo_fn=fn
      )
  )


def _check_objective(objective: str) -> None:
  if objective not in OBJECTIVES:
    raise ValueError(f'unknown objective {objective!r}; valid objectives: {", ".join(OBJECTIVES)}')


def per_example_loss(
    objective: str,
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    slic_delta: float = 1.0,
    dpop_lambda: float = 50.0,
    gpo_fn: str = "logistic",
) -> jax.Array:
  """The [B] float32 per-example loss of `objective` (no SFT term). Refs may be None for REFERENCE_FREE."""
  _check_objective(objective)
  if objective == "cross_entropy":
    (s_w,) = _check_logps(policy_chosen_logps=policy_chosen_logps)
    return -s_w
  if objective == "slic":
    s_w, s_l = _check_logps(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
    return jax.nn.relu(slic_delta - (s_w - s_l))
  s_w, s_l, r_w, r_l = _check_logps(
      policy_chosen_logps=policy_chosen_logps,
      policy_rejected_logps=policy_rejected_logps,
      ref_chosen_logps=ref_chosen_logps,
      ref_rejected_logps=ref_rejected_logps,
  )
  _check_beta(beta)
  h = (s_w - s_l) - (r_w - r_l)
  if objective == "dpo":
    _check_label_smoothing(label_smoothing)
    return _dpo_per_example(h, beta, label_smoothing)
  if objective == "ipo":
    return (h - 1.0 / (2.0 * beta)) ** 2
  if objective == "dpop":
    _check_label_smoothing(label_smoothing)
    return _dpo_per_example(h, beta, label_smoothing) + dpop_lambda * jax.nn.relu(r_w - s_w)
  _check_gpo_fn(gpo_fn)
  return GPO_FUNCTIONS[gpo_fn][0](beta * h)


def preference_metrics(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *, beta: float
) -> dict[str, jax.Array]:
  """TRL-named batch means: rewards/{chosen,rejected,margins,accuracies}, logps/{chosen,rejected}[_change].

  rewards/* and logps/*_change need the reference log-probs and are omitted when they are None.
  """
  s_w, s_l = (
      jax.lax.stop_gradient(jnp.asarray(x).astype(jnp.float32)) for x in (policy_chosen_logps, policy_rejected_logps)
  )
  metrics = {"logps/chosen": jnp.mean(s_w), "logps/rejected": jnp.mean(s_l)}
  if ref_chosen_logps is None or ref_rejected_logps is None:
    return metrics
  r_w, r_l = (jnp.asarray(x).astype(jnp.float32) for x in (ref_chosen_logps, ref_rejected_logps))
  reward_w, reward_l = beta * (s_w - r_w), beta * (s_l - r_l)
  metrics.update(
      {
          "rewards/chosen": jnp.mean(reward_w),
          "rewards/rejected": jnp.mean(reward_l),
          "rewards/margins": jnp.mean(reward_w - reward_l),
          "rewards/accuracies": jnp.mean((reward_w > reward_l).astype(jnp.float32)),
          "logps/chosen_change": jnp.mean(s_w - r_w),
          "logps/rejected_change": jnp.mean(s_l - r_l),
      }
  )
  return metrics


def preference_loss(
    objective: str,
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta: float,
    sft_coeff: float = 0.0,
    label_smoothing: float = 0.0,
    slic_delta: float = 1.0,
    dpop_lambda: float = 50.0,
    gpo_fn: str = "logistic",
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(mean loss + sft_coeff * (-mean s_w), metrics) for objective in OBJECTIVES.

  The keyword names match config.loss (configs/base.py); the ones an objective does not use are ignored.
  Metrics: see `preference_metrics`, plus 'loss' (total) and 'loss/sft' (-mean s_w) when sft_coeff != 0.
  """
  _check_objective(objective)
  losses_B = per_example_loss(
      objective,
      policy_chosen_logps,
      policy_rejected_logps,
      ref_chosen_logps,
      ref_rejected_logps,
      beta=beta,
      label_smoothing=label_smoothing,
      slic_delta=slic_delta,
      dpop_lambda=dpop_lambda,
      gpo_fn=gpo_fn,
  )
  loss = jnp.mean(losses_B)
  metrics = preference_metrics(
      policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=beta
  )
  if not (_is_concrete(sft_coeff) and float(sft_coeff) == 0.0):
    sft = cross_entropy_loss(policy_chosen_logps)
    loss = loss + sft_coeff * sft
    metrics["loss/sft"] = jax.lax.stop_gradient(sft)
  metrics["loss"] = jax.lax.stop_gradient(loss)
  return loss, metrics


def loss_derivative(
    objective: str,
    margin,
    *,
    beta: float,
    ref_margin=0.0,
    label_smoothing: float = 0.0,
    slic_delta: float = 1.0,
    gpo_fn: str = "logistic",
) -> jax.Array:
  """l'(d): derivative of the per-sample loss w.r.t. d = ln p(y+) - ln p(y-), at d = `margin` (float32).

  `ref_margin` is d_ref = ln p_ref(y+) - ln p_ref(y-) (ignored by slic). Closed forms:
    dpo   -beta [(1-eps) sigmoid(-beta h) - eps sigmoid(beta h)],  h = d - d_ref
    ipo   2 (h - 1/(2 beta));  slic  -1[d < delta];  gpo  beta f'(beta h)
    dpop  the DPO term's derivative (its penalty depends on s_w alone, not on d)
  cross_entropy is not a function of d and raises ValueError.
  """
  _check_objective(objective)
  if objective == "cross_entropy":
    raise ValueError("objective 'cross_entropy' (-s_w) is not a function of the margin d; it has no l'")
  d = jnp.asarray(margin, jnp.float32)
  if objective == "slic":
    return -(d < slic_delta).astype(jnp.float32)
  _check_beta(beta)
  h = d - jnp.asarray(ref_margin, jnp.float32)
  if objective in ("dpo", "dpop"):
    _check_label_smoothing(label_smoothing)
    return -beta * ((1.0 - label_smoothing) * jax.nn.sigmoid(-beta * h) - label_smoothing * jax.nn.sigmoid(beta * h))
  if objective == "ipo":
    return 2.0 * (h - 1.0 / (2.0 * beta))
  _check_gpo_fn(gpo_fn)
  return beta * GPO_FUNCTIONS[gpo_fn][1](beta * h)
