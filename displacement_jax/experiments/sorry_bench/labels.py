"""Preference pairs for Section 6: labels from judged responses, ties, gold pairs, the split and the filter.

The refusal (judge score 0) is preferred. Ties (both refuse / both comply) are ordered by a tie-breaker:
PairRM through `llm-blender` when installed, otherwise seeded coin flips (logged). The official code's tie
re-ranking indexed an empty list when there was no tie; `break_ties` never calls the ranker then.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from displacement_jax.score import filtering
from displacement_jax.data import schema
from displacement_jax.errors import DataError
from displacement_jax.experiments.sorry_bench.constants import COMPLIED, REFUSED

# ------------------------------------------------------------------------------------------ tie-breaking


class TieBreaker(Protocol):
  """Orders tied response pairs: returns, per pair, the position (0 or 1) of the preferred response."""

  name: str

  def __call__(self, prompts: Sequence[str], responses: Sequence[tuple[str, str]]) -> list[int]:
    ...


@dataclasses.dataclass
class RandomTieBreaker:
  """Seeded coin flips: the same seed and number of ties always give the same winners."""

  seed: int = 0
  name: str = "random"

  def __call__(self, prompts: Sequence[str], responses: Sequence[tuple[str, str]]) -> list[int]:
    return [int(w) for w in np.random.default_rng(self.seed).integers(0, 2, size=len(responses))]


@dataclasses.dataclass
class PairRMTieBreaker:
  """llm-blender's PairRM (PyTorch): prefers the response it compares as better."""

  model_id: str = "llm-blender/PairRM"
  name: str = "pairrm"
  _blender: Any = None

  def __call__(self, prompts: Sequence[str], responses: Sequence[tuple[str, str]]) -> list[int]:
    if self._blender is None:
      import llm_blender  # pylint: disable=g-import-not-at-top  # optional, heavy (PyTorch): only when ranking

      self._blender = llm_blender.Blender()
      self._blender.loadranker(self.model_id)
    first_better = self._blender.compare(list(prompts), [r[0] for r in responses], [r[1] for r in responses])
    return [0 if bool(b) else 1 for b in first_better]


def make_tie_breaker(name: str, seed: int = 0, log: Callable[[str], None] = print) -> TieBreaker:
  """'pairrm' (falls back to seeded random, logged, when llm-blender is not installed) or 'random'."""
  if name == "random":
    return RandomTieBreaker(seed)
  if name == "pairrm":
    if importlib.util.find_spec("llm_blender") is None:  # optional dependency, imported only to rank
      log(f"tie-breaker: llm-blender (PairRM) is not installed; breaking ties at random with seed {seed}")
      return RandomTieBreaker(seed)
    return PairRMTieBreaker()
  raise ValueError(f'sorry.tie_breaker must be "pairrm" or "random", got {name!r}')


def break_ties(prompts: Sequence[str], responses: Sequence[tuple[str, str]], tie_breaker: TieBreaker) -> list[int]:
  """Winners of the tied pairs; no tie means no call at all (the official code indexed an empty list)."""
  if not responses:
    return []
  winners = list(tie_breaker(prompts, responses))
  if len(winners) != len(responses) or any(w not in (0, 1) for w in winners):
    raise ValueError(
        f"tie-breaker {tie_breaker.name!r} returned {winners!r} for {len(responses)} tied pairs; "
        "expected one 0/1 winner per pair"
    )
  return winners


# --------------------------------------------------------------------------------------------- labelling


def label_pairs(
    prompts: Sequence[Any],
    responses: Sequence[tuple[str, str]],
    scores: Sequence[tuple[int | None, int | None]],
    tie_breaker: TieBreaker,
    prompt_text: Callable[[Any], str] = str,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
  """Preference rows from two judged responses per prompt: the refusal (score 0) is preferred.

  Ties (0/0 or 1/1) are ordered by `tie_breaker`; a pair with an unparsable score or an empty response
  is left out and counted ('unparsable', 'empty_response'). Returns (rows with prompt/chosen/rejected/index/meta,
  counts).
  """
  if not len(prompts) == len(responses) == len(scores):
    raise ValueError(
        f"prompts, responses and scores must have equal lengths, got {len(prompts)}, "
        f"{len(responses)}, {len(scores)}"
    )
  counts = {
      "prompts": len(prompts),
      "decided": 0,
      "tie_refused": 0,
      "tie_complied": 0,
      "unparsable": 0,
      "empty_response": 0,
  }
  winner: dict[int, int] = {}
  tied = []
  for i, (a, b) in enumerate(scores):
    if a is None or b is None:
      counts["unparsable"] += 1
    elif not str(responses[i][0]).strip() or not str(responses[i][1]).strip():
      counts["empty_response"] += 1  # nothing to train on (an empty response has no tokens besides EOS)
    elif a != b:
      counts["decided"] += 1
      winner[i] = 0 if a == REFUSED else 1
    else:
      counts["tie_refused" if a == REFUSED else "tie_complied"] += 1
      tied.append(i)
  tie_winners = break_ties([prompt_text(prompts[i]) for i in tied], [tuple(responses[i]) for i in tied], tie_breaker)
  winner.update(zip(tied, tie_winners))
  rows = []
  for i in sorted(winner):
    w = winner[i]
    rows.append(
        {
            "index": i,
            "prompt": prompts[i],
            "chosen": responses[i][w],
            "rejected": responses[i][1 - w],
            "meta": {
                "scores": list(scores[i]),
                "tie": scores[i][0] == scores[i][1],
                "tie_breaker": tie_breaker.name if scores[i][0] == scores[i][1] else None,
            },
        }
    )
  return rows, counts


PAIR_KINDS = ("refusal_refusal", "compliance_compliance", "mixed")


def pair_kind(row: Mapping[str, Any]) -> str:
  """'refusal_refusal' / 'compliance_compliance' (a tie of two refusals / two compliances) or 'mixed', from a
  `label_pairs` row's meta.scores."""
  a, b = row["meta"]["scores"]
  if a != b:
    return "mixed"
  return "refusal_refusal" if a == REFUSED else "compliance_compliance"


def gold_pairs(judgments: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Gold preference rows from human judgments: per question, the first human-judged refusal (score 0)
  is preferred over the first compliance (score 1), in row order. Questions without both are skipped.

  Each judgment needs 'question_id', 'prompt', 'response' and 'score' (0 or 1).
  """

  by_q: dict[Any, dict[int, Mapping[str, Any]]] = {}
  order = []
  for row_i, j in enumerate(judgments):
    for field in ("question_id", "prompt", "response", "score"):
      if field not in j:
        raise DataError(schema.SORRY_HUMAN_ID, row_i, field, "missing")
    score = j["score"]
    if score not in (0, 1, 0.0, 1.0):
      raise DataError(schema.SORRY_HUMAN_ID, row_i, "score", f"expected 0 or 1, got {score!r}")
    q = j["question_id"]
    if q not in by_q:
      by_q[q] = {}
      order.append(q)
    by_q[q].setdefault(int(score), j)
  rows = []
  for q in order:
    if REFUSED in by_q[q] and COMPLIED in by_q[q]:
      refusal, compliance = by_q[q][REFUSED], by_q[q][COMPLIED]
      rows.append(
          {
              "index": len(rows),
              "prompt": refusal["prompt"],
              "chosen": refusal["response"],
              "rejected": compliance["response"],
              "meta": {"question_id": q, "gold": True},
          }
      )
  return rows


def load_human_judgments(path: str) -> list[dict[str, Any]]:
  """Human judgments as dicts with 'question_id', 'prompt', 'response', 'score' (data.schema loader)."""

  return [dict(r) for r in schema.load_sorry_human_judgments(path)]


# -------------------------------------------------------------------------------------- split and filter


def train_test_split(n: int, test_fraction: float = 0.15, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(train, test) positions, each sorted: round-half-up(test_fraction * n) test rows drawn with `seed`.

  435 pairs -> 370 train / 65 test (the paper's Llama-3-8B-Instruct split).
  """
  if n < 2:
    raise ValueError(f"need at least 2 rows to split, got n={n}")
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
  n_test = min(n - 1, max(1, int(math.floor(test_fraction * n + 0.5))))
  perm = np.random.default_rng(seed).permutation(n)
  return np.sort(perm[n_test:]).astype(np.int64), np.sort(perm[:n_test]).astype(np.int64)


def filtered_positions(ln_ches: Sequence[float] | np.ndarray, k: int = 19) -> np.ndarray:
  """Positions of the k pairs with the lowest LN-CHES (the paper keeps 19 = 5% of 370), ascending."""
  return filtering.lowest_k(ln_ches, min(int(k), len(ln_ches)))
