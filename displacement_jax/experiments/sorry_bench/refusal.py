"""Refusal rates: the share of responses the judge scores as refusing (Figure 3's quantity)."""

from __future__ import annotations

from typing import Any, Sequence

import ml_collections
import numpy as np

from displacement_jax.experiments.sorry_bench import generation, judge as judge_lib
from displacement_jax.experiments.sorry_bench.constants import REFUSED


def refusal_rate(scores: Sequence[int | None]) -> dict[str, Any]:
  """Share of parsable judge scores that are refusals (0); unparsable ones are counted and excluded."""
  parsed = [s for s in scores if s is not None]
  n_unparsable = len(scores) - len(parsed)
  rate = float(np.mean([s == REFUSED for s in parsed])) if parsed else float("nan")
  return {"refusal_rate": rate, "n": len(scores), "n_parsed": len(parsed), "n_unparsable": n_unparsable}


def refusal_rates(
    policy: generation.Generator,
    judge: judge_lib.Judge,
    questions: Sequence[str],
    config: ml_collections.ConfigDict,
    seed: int,
) -> dict[str, Any]:
  """Refusal rate of `policy` on `questions`: one response each at sorry.eval_temperature, judged greedily."""
  sc = config.sorry
  if not questions:
    return refusal_rate([])
  responses = policy(
      list(questions), temperature=float(sc.eval_temperature), max_new_tokens=int(sc.max_new_tokens), seed=seed
  )
  scores, _ = judge_lib.judge_responses(judge, questions, responses, max_new_tokens=int(sc.judge_max_new_tokens))
  return refusal_rate(scores)
