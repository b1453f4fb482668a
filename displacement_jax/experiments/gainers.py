"""Where the probability mass went: at the y+ token that lost the most, which tokens gained.

For one pair, `TokenShift` holds the next-token distributions at the positions predicting each y+ token, before and
after training (`token_shift`: two forwards of prompt + y+). `worst_position` is the y+ token whose probability
fell the most; `top_gainers` the tokens (other than that y+ token) whose probability rose the most there. Over
many pairs, `gainer_counts` tallies each pair's top gainer among the pairs whose ln pi(y+) fell: the search's
"top gainers" column (`describe_counts`).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Sequence

import jax
import numpy as np

PAD_MULTIPLE = 16  # sequences are right-padded to a multiple of this: one compile per length bucket


@dataclasses.dataclass
class TokenShift:
  """One pair's y+ token ids [K] and next-token probabilities [K, V] before and after, at the positions that
  predict each y+ token (position k predicts y_k)."""

  tokens_K: np.ndarray
  before_KV: np.ndarray
  after_KV: np.ndarray

  @property
  def p_before_K(self) -> np.ndarray:
    return self.before_KV[np.arange(len(self.tokens_K)), self.tokens_K]

  @property
  def p_after_K(self) -> np.ndarray:
    return self.after_KV[np.arange(len(self.tokens_K)), self.tokens_K]

  def worst_position(self) -> int:
    """The y+ position whose token probability fell the most (after - before smallest)."""
    return int(np.argmin(self.p_after_K - self.p_before_K))

  def top_gainers(self, n: int = 3) -> list[tuple[int, float]]:
    """(token id, probability gain) of the n tokens that gained most at `worst_position`, its y+ token excluded."""
    k = self.worst_position()
    gain_V = (self.after_KV[k] - self.before_KV[k]).astype(np.float64)
    gain_V[self.tokens_K[k]] = -np.inf
    top = np.argsort(-gain_V)[:n]
    return [(int(t), float(gain_V[t])) for t in top]


def make_probs_fn(model: Any) -> Callable[[Any, np.ndarray], np.ndarray]:
  """A jitted (params, ids [1, T]) -> float32 next-token probabilities [1, T, V] of one right-padded sequence (a
  causal model: the padding after the sequence does not change the positions before it)."""

  @jax.jit
  def probs(params: Any, ids_BT: Any) -> Any:
    logits_BTV = model.apply({"params": params}, ids_BT, np.ones(ids_BT.shape, bool), return_logits=True).logits_BTV
    return jax.nn.softmax(logits_BTV.astype(np.float32), axis=-1)

  return probs


def token_shift(
    probs_fn: Callable[[Any, np.ndarray], np.ndarray],
    params_before: Any,
    params_after: Any,
    prompt_ids: Sequence[int],
    chosen_ids: Sequence[int],
    pad_id: int = 0,
) -> TokenShift:
  """The `TokenShift` of one pair (its prompt and y+ token ids) between two parameter sets."""
  ids = list(prompt_ids) + list(chosen_ids)
  width = -(-len(ids) // PAD_MULTIPLE) * PAD_MULTIPLE
  ids_BT = np.full((1, width), pad_id, np.int32)
  ids_BT[0, : len(ids)] = ids
  sl = slice(len(prompt_ids) - 1, len(ids) - 1)
  before = np.asarray(probs_fn(params_before, ids_BT))[0, sl]
  after = np.asarray(probs_fn(params_after, ids_BT))[0, sl]
  return TokenShift(np.asarray(chosen_ids, np.int64), before, after)


def gainer_counts(
    probs_fn: Callable[[Any, np.ndarray], np.ndarray],
    params_before: Any,
    params_after: Any,
    pairs: Sequence[Any],
    fell_N: np.ndarray,
    pad_id: int = 0,
) -> collections.Counter:
  """Counter of (y+ token that fell most, the token that gained most there) over the pairs with `fell_N` true
  (`pairs`: tokenized pairs with prompt_ids / chosen_ids)."""
  counts = collections.Counter()
  for pair, fell in zip(pairs, fell_N):
    if not fell:
      continue
    shift = token_shift(probs_fn, params_before, params_after, pair.prompt_ids, pair.chosen_ids, pad_id)
    counts[(int(shift.tokens_K[shift.worst_position()]), shift.top_gainers(1)[0][0])] += 1
  return counts


def describe_counts(counts: collections.Counter, decode: Callable[[list[int]], str], n: int = 3) -> str:
  """'<fell> -> <gained> (count)' of the n most common, e.g. "'<|im_end|>'->' It' (12), '.'->',' (5)"; '-' if none."""
  if not counts:
    return "-"
  return ", ".join(f"{decode([a])!r}->{decode([b])!r} ({c})" for (a, b), c in counts.most_common(n))
