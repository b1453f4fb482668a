"""What the pipelines write in result.json and how runs are reduced over seeds (used by them and by report).

- persona (Section 3): `summarize_seed` -- the largest drop of pi(y+), the gaining tokens split into benign /
  catastrophic (`classify_gainers`) and the unembedding metrics at start and end (`UNEMBEDDING_KEYS`);
- quantiles (Section 5): `aggregate` -- mean / min / max over seeds of the preferred log-prob change per
  (measure, q), and `measure_order_agreement`, the paper's ordering claim.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from displacement_jax.experiments import persona_data, quantiles_plan
from displacement_jax.displacement import ranks, sign_agreement, spearman  # pylint: disable=unused-import

UNEMBEDDING_KEYS = ("w_pos_norm", "w_neg_norm", "w_pos_dot_w_neg", "w_diff_proj_on_pos", "w_diff_orth_norm")

# ---------------------------------------------------------------------------------------------- persona


def _norm_token(token: str) -> str:
  return token.replace("\u2581", " ").replace("\u0120", " ").strip().lower()


def classify_gainers(tokens: Sequence[str], preferred: str) -> dict[str, list[str]]:
  """Split gaining tokens into 'benign' (same meaning as y+) and 'catastrophic' (opposite meaning).

  Meanings follow the SFT lists: YES_TOKENS versus NO_TOKENS (which include Maybe/Perhaps). Token
  strings are compared after dropping SentencePiece/BPE space markers and case.
  """
  yes = {_norm_token(t) for t in persona_data.YES_TOKENS}
  no = {_norm_token(t) for t in persona_data.NO_TOKENS}
  pref = _norm_token(preferred)
  if pref not in yes | no:
    raise ValueError(f"preferred token {preferred!r} is in neither YES_TOKENS nor NO_TOKENS")
  same, opposite = (yes, no) if pref in yes else (no, yes)
  out: dict[str, list[str]] = {"benign": [], "catastrophic": []}
  for token in tokens:
    t = _norm_token(token)
    if t == pref:
      continue
    if t in same:
      out["benign"].append(token)
    elif t in opposite:
      out["catastrophic"].append(token)
  return out


def largest_drop(prob_T: Sequence[float]) -> dict[str, float]:
  """Largest drop of pi(y+) below its start: start, min, end and start - min (>= 0)."""
  p = np.asarray(prob_T, np.float64)
  if p.ndim != 1 or p.size == 0:
    raise ValueError(f"prob_T must be a non-empty 1-D sequence, got shape {p.shape}")
  return {
      "start": float(p[0]),
      "min": float(p.min()),
      "end": float(p[-1]),
      "largest_drop": float(max(p[0] - p.min(), 0.0)),
      "argmin_step": int(np.argmin(p)),
  }


def summarize_seed(metric_rows: Sequence[Mapping[str, Any]], pair: tuple[str, str]) -> dict[str, Any]:
  """result.json of one DPO seed from its metrics rows (monitor keys of every evaluated step)."""
  mon = [r for r in metric_rows if "monitor/preferred_prob" in r]
  if not mon:
    raise ValueError("no monitor/preferred_prob rows in the metrics: was data.single_token set?")
  drop = largest_drop([r["monitor/preferred_prob"] for r in mon])
  last = mon[-1]
  gainers = list(last.get("monitor/top_k_gainers_tokens", []))
  out = {
      "family": "persona",
      "preferred": pair[0],
      "dispreferred": pair[1],
      **drop,
      "preferred_logprob_change": float(last["monitor/preferred_logprob_change"]),
      "dispreferred_logprob_change": float(last["monitor/dispreferred_logprob_change"]),
      "top_k_gainers": gainers,
      "top_k_predicted": list(last.get("monitor/top_k_predicted_tokens", [])),
      "top_k_overlap": last.get("monitor/top_k_overlap"),
      **classify_gainers(gainers, pair[0]),
  }
  first = mon[0]
  for key in UNEMBEDDING_KEYS:
    if f"monitor/{key}" in first:
      out[f"{key}_start"] = float(first[f"monitor/{key}"])
      out[f"{key}_end"] = float(last[f"monitor/{key}"])
  return out


# -------------------------------------------------------------------------------------------- quantiles


def aggregate(results: Sequence[Mapping[str, Any]], key: str = "preferred_logprob_change") -> list[dict[str, Any]]:
  """Mean / min / max of `key` over seeds for every (measure, q), sorted by measure order then q.

  Each result needs 'measure', 'q', 'seed' and `key`. Repeated (measure, q, seed) entries raise.
  """
  groups: dict[tuple[str, float], dict[int, float]] = {}
  for i, r in enumerate(results):
    for field in ("measure", "q", "seed", key):
      if field not in r:
        raise ValueError(f"result {i} has no field {field!r}: {dict(r)}")
    seeds = groups.setdefault((str(r["measure"]), float(r["q"])), {})
    if int(r["seed"]) in seeds:
      raise ValueError(f'result {i}: repeated (measure={r["measure"]}, q={r["q"]}, seed={r["seed"]})')
    seeds[int(r["seed"])] = float(r[key])
  order = {m: i for i, m in enumerate(quantiles_plan.MEASURES)}
  rows = []
  for (measure, q), seeds in sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0][0], kv[0][1])):
    values = np.array([seeds[s] for s in sorted(seeds)], np.float64)
    rows.append(
        {
            "measure": measure,
            "q": q,
            "mean": float(values.mean()),
            "min": float(values.min()),
            "max": float(values.max()),
            "n_seeds": int(values.size),
            "seeds": sorted(seeds),
        }
    )
  return rows


def measure_order_agreement(rows: Sequence[Mapping[str, Any]], measure: str) -> float:
  """Spearman-style check of the paper's claim: the share of adjacent quantile pairs (q_i < q_j) of
  `measure` whose mean preferred change falls as q grows (1.0 = strictly more displacement at higher q)."""
  pts = sorted((r["q"], r["mean"]) for r in rows if r["measure"] == measure)
  if len(pts) < 2:
    raise ValueError(f"need at least two quantiles of {measure!r} to compare, got {len(pts)}")
  return float(np.mean([b[1] < a[1] for a, b in zip(pts, pts[1:])]))


# ---------------------------------------------------------------------------------------------- agreement


# ranks, spearman, sign_agreement: displacement_jax.displacement (the training monitor uses them too), re-exported here.
