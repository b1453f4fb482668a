"""Displacement monitor: how the preferred / dispreferred log-probs moved against the reference model.

Pure functions over numpy arrays (the train loop computes the log-probs):
- `logprob_change_stats`: mean preferred / dispreferred change and the share of samples whose preferred
  log-prob fell (likelihood displacement, Definition 1: ln pi_t(y+|x) < ln pi_0(y+|x)).
- `top_k_gainers` / `top_k_overlap`: single-token mode, which tokens gained probability most, beside the
  ranking predicted by the unconstrained-features theory (Theorem 2, `theory.rank_gainers`).
- `unembedding_metrics(W_VD, y_pos, y_neg)`: ||W+||, ||W-||, <W+, W->, and the decomposition of W+ - W-
  into its projection on W+ and the orthogonal part (Section 3 / Appendix of the paper).
- `displacement_warning`: the line printed when the preferred log-prob falls while the loss falls.
- `audit_agreement`: with `eval.audit`, the displacement audit's prediction per monitored pair against the
  measured change (Spearman, sign agreement, the pairs).
Every key returned is prefixed with 'monitor/' so it can go straight into metrics.jsonl.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from displacement_jax import theory

PREFIX = "monitor/"
# A preferred log-prob counts as fallen (Definition 1) only when it is below its reference by more than
# FALL_RTOL * max(1, |reference|): float32 log-prob sums carry rounding noise of that relative size.
FALL_RTOL = 1e-5
# The displacement warning needs the mean preferred log-prob below its reference by more than this (nats).
WARNING_NATS = 0.01
LOSS_NOISE = 1e-4  # a loss change below this share of the loss is float noise (the warning line shows 4 digits)


def fell(preferred_change_B: Any, preferred_ref_B: Any, xp: Any = np) -> Any:
  """[B] bool: the preferred log-prob fell below its reference beyond the float noise floor (FALL_RTOL).

  `xp` is numpy or jax.numpy (the train step uses the same rule on device).
  """
  return preferred_change_B < -FALL_RTOL * xp.maximum(1.0, xp.abs(preferred_ref_B))


def share_preferred_fell(preferred_change_B: np.ndarray, preferred_ref_B: np.ndarray | None = None) -> float:
  """Share of samples whose preferred log-prob is below its reference value (Definition 1), beyond the
  float noise floor `fell` (relative to |reference|; without `preferred_ref_B`, relative to 1 nat)."""
  change = np.asarray(preferred_change_B, np.float64)
  if change.ndim != 1 or change.size == 0:
    raise ValueError(f"preferred_change_B must be a non-empty 1-D array, got shape {change.shape}")
  ref = np.zeros_like(change) if preferred_ref_B is None else np.asarray(preferred_ref_B, np.float64)
  return float(np.mean(fell(change, ref)))


def logprob_change_stats(
    pos_B: np.ndarray, neg_B: np.ndarray, pos_ref_B: np.ndarray, neg_ref_B: np.ndarray
) -> dict[str, float]:
  """Mean preferred / dispreferred sequence log-prob change vs the reference and the Definition-1 share."""
  arrays = {"pos_B": pos_B, "neg_B": neg_B, "pos_ref_B": pos_ref_B, "neg_ref_B": neg_ref_B}
  shapes = {k: np.shape(v) for k, v in arrays.items()}
  if len(set(shapes.values())) != 1 or len(shapes["pos_B"]) != 1:
    raise ValueError(f"logprob_change_stats needs equal 1-D arrays, got {shapes}")
  pos_change = np.asarray(pos_B, np.float64) - np.asarray(pos_ref_B, np.float64)
  neg_change = np.asarray(neg_B, np.float64) - np.asarray(neg_ref_B, np.float64)
  return {
      PREFIX + "preferred_logprob_change": float(pos_change.mean()),
      PREFIX + "dispreferred_logprob_change": float(neg_change.mean()),
      PREFIX + "margin_change": float((pos_change - neg_change).mean()),
      PREFIX + "share_preferred_fell": share_preferred_fell(pos_change, pos_ref_B),
      PREFIX + "preferred_logprob": float(np.mean(pos_B)),
      PREFIX + "dispreferred_logprob": float(np.mean(neg_B)),
  }


def top_k_gainers(prob_V: np.ndarray, prob_ref_V: np.ndarray, k: int, exclude: Sequence[int] = ()) -> np.ndarray:
  """Token ids of the k largest probability increases prob_V - prob_ref_V (ties: lower id first)."""
  prob_V, prob_ref_V = np.asarray(prob_V, np.float64), np.asarray(prob_ref_V, np.float64)
  if prob_V.shape != prob_ref_V.shape or prob_V.ndim != 1:
    raise ValueError(f"prob_V and prob_ref_V must be equal 1-D arrays, got {prob_V.shape} and {prob_ref_V.shape}")
  if not 0 < k <= prob_V.size:
    raise ValueError(f"top_k must be in [1, {prob_V.size}], got {k}")
  gain = prob_V - prob_ref_V
  gain[np.asarray(list(exclude), np.int64)] = -np.inf
  order = np.lexsort((np.arange(gain.size), -gain))
  return order[:k]


def top_k_overlap(measured: Sequence[int], predicted: Sequence[int]) -> float:
  """|measured ∩ predicted| / |measured|: agreement between observed and predicted top-k gainers."""
  measured, predicted = list(measured), list(predicted)
  if not measured or len(measured) != len(predicted):
    raise ValueError(f"top-k lists must be non-empty and of equal length, got {len(measured)} and {len(predicted)}")
  return len(set(measured) & set(predicted)) / len(measured)


def unembedding_metrics(W_VD: np.ndarray, y_pos: int, y_neg: int) -> dict[str, float]:
  """Norms and inner product of the preferred/dispreferred token unembeddings and W+ - W- split on W+.

  Returns ||W+||, ||W-||, <W+, W->, the signed length of the projection of W+ - W- on W+
  (<W+ - W-, W+> / ||W+||) and the norm of the component of W+ - W- orthogonal to W+.
  """
  W = np.asarray(W_VD, np.float64)
  if W.ndim != 2:
    raise ValueError(f"W_VD must be [vocab, hidden], got shape {W.shape}")
  for name, y in (("y_pos", y_pos), ("y_neg", y_neg)):
    if not 0 <= int(y) < W.shape[0]:
      raise ValueError(f"{name}={y} is outside the vocabulary of W_VD with shape {W.shape}")
  w_pos, w_neg = W[int(y_pos)], W[int(y_neg)]
  diff = w_pos - w_neg
  pos_norm = float(np.linalg.norm(w_pos))
  unit = w_pos / pos_norm if pos_norm > 0 else np.zeros_like(w_pos)
  proj = float(diff @ unit)
  orth = diff - proj * unit
  return {
      PREFIX + "w_pos_norm": pos_norm,
      PREFIX + "w_neg_norm": float(np.linalg.norm(w_neg)),
      PREFIX + "w_pos_dot_w_neg": float(w_pos @ w_neg),
      PREFIX + "w_diff_proj_on_pos": proj,
      PREFIX + "w_diff_orth_norm": float(np.linalg.norm(orth)),
  }


def predicted_gainers(
    W_VD: np.ndarray, h_ND: np.ndarray, y_pos_N: np.ndarray, y_neg_N: np.ndarray, prob_NV: np.ndarray, k: int
) -> np.ndarray:
  """Top-k tokens the unconstrained-features theory predicts to gain most (Theorem 2), excluding y+/y-.

  For several samples the predicted d/dt ln pi(z) rates (`theory.token_rates`) are averaged over samples
  before ranking; for one sample this is exactly `theory.rank_gainers`.
  """

  W = np.asarray(W_VD, np.float32)
  h_ND, prob_NV = np.asarray(h_ND, np.float32), np.asarray(prob_NV, np.float32)
  y_pos_N, y_neg_N = np.asarray(y_pos_N).reshape(-1), np.asarray(y_neg_N).reshape(-1)
  if h_ND.ndim != 2 or h_ND.shape[1] != W.shape[1]:
    raise ValueError(f"h_ND must be [N, {W.shape[1]}], got shape {h_ND.shape}")
  if len(y_pos_N) == 1:
    ranked = np.asarray(theory.rank_gainers(W, h_ND[0], int(y_pos_N[0]), int(y_neg_N[0])))
    return ranked[:k]
  rates = np.zeros(W.shape[0], np.float64)
  for h, yp, yn in zip(h_ND, y_pos_N, y_neg_N):
    rates += np.asarray(theory.token_rates(W, h, int(yp), int(yn)), np.float64)
  excluded = set(y_pos_N.tolist()) | set(y_neg_N.tolist())
  rates[list(excluded)] = -np.inf
  return np.lexsort((np.arange(rates.size), -rates))[:k]


def single_token_report(
    prob_now_NV: np.ndarray,
    prob_ref_V: np.ndarray,
    predicted_top_k: np.ndarray,
    y_pos_N: np.ndarray,
    y_neg_N: np.ndarray,
    k: int,
    token_names: Sequence[str] | None = None,
) -> dict[str, Any]:
  """Measured top-k gainers (mean probability change over samples) beside the predicted ones, and overlap."""
  exclude = sorted(set(np.asarray(y_pos_N).reshape(-1).tolist()) | set(np.asarray(y_neg_N).reshape(-1).tolist()))
  measured = top_k_gainers(np.asarray(prob_now_NV, np.float64).mean(0), prob_ref_V, k, exclude)
  out: dict[str, Any] = {
      PREFIX + "top_k_gainers": [int(t) for t in measured],
      PREFIX + "top_k_predicted": [int(t) for t in predicted_top_k],
      PREFIX + "top_k_overlap": top_k_overlap(measured, predicted_top_k),
  }
  if token_names is not None:
    out[PREFIX + "top_k_gainers_tokens"] = [token_names[int(t)] for t in measured]
    out[PREFIX + "top_k_predicted_tokens"] = [token_names[int(t)] for t in predicted_top_k]
  return out


def single_token_row(
    W_VD: np.ndarray,
    h_ND: np.ndarray,
    prob_NV: np.ndarray,
    prob_ref_V: np.ndarray,
    y_pos_N: np.ndarray,
    y_neg_N: np.ndarray,
    k: int,
    step: int,
    token_names: Sequence[str] | None = None,
) -> dict[str, Any]:
  """The single-token monitor keys at `step`: measured vs predicted top-k gainers (at step 0 only the prediction:
  nothing trained yet, measured gains are rounding noise), the unembedding metrics of the first pair and the mean
  pi(y+) over the N samples."""
  y_pos_N, y_neg_N = np.asarray(y_pos_N).reshape(-1), np.asarray(y_neg_N).reshape(-1)
  k = min(int(k), W_VD.shape[0] - 2)
  predicted = predicted_gainers(W_VD, h_ND, y_pos_N, y_neg_N, prob_NV, k)
  out = single_token_report(prob_NV, prob_ref_V, predicted, y_pos_N, y_neg_N, k, token_names)
  if step == 0:
    out = {key: v for key, v in out.items() if "predicted" in key}
  out.update(unembedding_metrics(W_VD, int(y_pos_N[0]), int(y_neg_N[0])))
  out[PREFIX + "preferred_prob"] = float(np.mean(np.asarray(prob_NV)[np.arange(len(y_pos_N)), y_pos_N]))
  return out


def displacement_warning(
    step: int,
    loss: float,
    preferred_change: float,
    prev_loss: float | None,
    prev_preferred_change: float | None,
    nats: float = WARNING_NATS,
) -> str | None:
  """A warning line when the loss fell since the previous eval while the mean preferred log-prob is below its
  reference by more than `nats` and lower than at the previous eval (likelihood displacement under way).

  `prev_loss` is the loss at the previous eval (the initial loss at the first eval; None: no warning).
  With no previous eval the preferred reference point is the start of training (change 0). A preferred
  log-prob that wiggles while still above (or within `nats` of) its reference never warns, nor does a loss that
  moved by less than LOSS_NOISE of itself (e.g. log 2 -> log 2 on chosen == rejected rows).
  """
  if prev_loss is None:
    return None
  prev_pref = 0.0 if prev_preferred_change is None else prev_preferred_change
  fell = prev_loss - loss > LOSS_NOISE * max(1.0, abs(prev_loss))  # 0.6931 -> 0.6931 is float noise, not a fall
  if fell and preferred_change < -nats and preferred_change < prev_pref:
    since = "the start" if prev_preferred_change is None else "the previous eval"
    return (
        f"WARNING likelihood displacement at step {step}: loss fell {prev_loss:.4g} -> {loss:.4g} while the "
        f"mean preferred log-prob fell since {since} ({prev_pref:+.4g} -> {preferred_change:+.4g} vs reference)"
    )
  return None


def format_line(step: int, metrics: dict[str, Any]) -> str:
  """One human-readable line of a monitor evaluation (the keys present in `metrics`)."""
  parts = []
  for key, label, fmt in (
      ("monitor/loss", "loss", ".4f"),
      ("monitor/preferred_logprob_change", "dlogp(y+)", "+.4f"),
      ("monitor/dispreferred_logprob_change", "dlogp(y-)", "+.4f"),
      ("monitor/share_preferred_fell", "share y+ fell", ".2f"),
      ("monitor/preferred_prob", "p(y+)", ".4f"),
      ("monitor/top_k_overlap", "top-k overlap", ".2f"),
  ):
    if key in metrics:
      parts.append(f"{label} {format(float(metrics[key]), fmt)}")
  if PREFIX + "top_k_gainers_tokens" in metrics:
    parts.append(
        f"gainers {metrics[PREFIX + 'top_k_gainers_tokens']} " f"predicted {metrics[PREFIX + 'top_k_predicted_tokens']}"
    )
  if metrics.get(PREFIX + "fell_rows"):
    fallen = zip(metrics[PREFIX + "fell_rows"], metrics[PREFIX + "fell_changes"])
    parts.append("y+ fell most: " + ", ".join(f"row {r} ({c:+.3g})" for r, c in fallen))
  return f"monitor step {step}: " + " | ".join(parts)


# A share of the monitored pairs whose preferred log-prob fell (Definition 1) at or above this warns
# (eval.warning_share), as does a mean preferred change this many nats below its peak (eval.warning_drop_nats).
WARNING_SHARE = 0.25
WARNING_DROP_NATS = 1.0


def fallen_pairs(
    preferred_change_B: np.ndarray, preferred_ref_B: np.ndarray, rows_B: Sequence[int], k: int
) -> dict[str, list]:
  """The (at most) k monitored pairs whose preferred log-prob fell most (Definition 1, `fell`), most fallen
  first: their row indices in the data (`rows_B`, 0-based) and their changes in nats."""
  change = np.asarray(preferred_change_B, np.float64)
  fallen = np.flatnonzero(fell(change, np.asarray(preferred_ref_B, np.float64)))
  worst = fallen[np.argsort(change[fallen], kind="stable")][: max(int(k), 0)]
  return {
      PREFIX + "fell_rows": [int(rows_B[i]) for i in worst],
      PREFIX + "fell_changes": [float(change[i]) for i in worst],
  }


def share_and_peak_warnings(
    step: int,
    share: float,
    preferred_change: float,
    prev_share: float | None,
    peak: float | None,
    *,
    share_threshold: float = WARNING_SHARE,
    drop_nats: float = WARNING_DROP_NATS,
) -> list[str]:
  """Warnings the mean alone misses: a share of pairs at or above `share_threshold` whose preferred log-prob
  fell (when it did not shrink since the previous eval), and a mean preferred change more than `drop_nats` below
  its peak so far (`peak`: the highest mean change of the earlier evals; None at the first)."""
  out = []
  if share >= share_threshold and (prev_share is None or share >= prev_share):
    out.append(
        f"WARNING likelihood displacement at step {step}: the preferred log-prob fell for {share:.0%} of the monitored "
        f"pairs (eval.warning_share={share_threshold:g})"
    )
  if peak is not None and peak - preferred_change > drop_nats:
    out.append(
        f"WARNING likelihood displacement at step {step}: the mean preferred log-prob change fell from its peak "
        f"{peak:+.4g} to {preferred_change:+.4g} (more than eval.warning_drop_nats={drop_nats:g})"
    )
  return out


def ranks(x: Sequence[float]) -> np.ndarray:
  """Ranks 0..n-1 of `x`, ties given their mean rank."""
  x = np.asarray(x, np.float64)
  order = np.argsort(x, kind="stable")
  r = np.empty(len(x), np.float64)
  r[order] = np.arange(len(x))
  for value in np.unique(x):
    tied = x == value
    r[tied] = r[tied].mean()
  return r


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
  """Spearman rank correlation (Pearson correlation of the tie-averaged ranks); NaN when a side is constant."""
  rx, ry = ranks(x), ranks(y)
  if len(rx) < 2 or rx.std() == 0 or ry.std() == 0:
    return float("nan")
  return float(np.corrcoef(rx, ry)[0, 1])


def sign_agreement(predicted: Sequence[float], measured: Sequence[float]) -> float:
  """Share of entries where the measured value has the predicted sign (0 counts as positive)."""
  p, m = np.asarray(predicted) >= 0, np.asarray(measured) >= 0
  return float(np.mean(p == m)) if len(p) else float("nan")


def audit_agreement(
    predicted: dict[str, np.ndarray], preferred_change_B: np.ndarray, rows_B: Sequence[int]
) -> dict[str, Any]:
  """The displacement audit's predictions of the change of ln pi(y+) over the whole run per monitored pair
  (`predicted`: {'first_order', 'along_direction'} [B], `evaluation.audit_predictions`) against the change
  measured so far: Spearman and sign agreement of each order, and per pair [row, first order, along, measured]
  (at the last step both describe the same run)."""
  measured = np.asarray(preferred_change_B, np.float64)
  out: dict[str, Any] = {}
  for order in ("first_order", "along_direction"):
    out[f"{PREFIX}audit_{order}_spearman"] = spearman(predicted[order], measured)
    out[f"{PREFIX}audit_{order}_sign_agreement"] = sign_agreement(predicted[order], measured)
  out[PREFIX + "audit_pairs"] = [
      [int(r), float(f), float(a), float(x)]
      for r, f, a, x in zip(rows_B, predicted["first_order"], predicted["along_direction"], measured)
  ]
  return out
