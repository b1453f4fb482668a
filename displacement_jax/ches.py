"""Centered hidden embedding similarity (CHES, Definitions 2-3 of Razin et al. 2025) and the baselines.

S+ = sum of the final hidden states (LM-head inputs) at the positions that predict a preferred-response token
(`loss_mask` of the batch contract: last prompt position .. second-to-last response token), S- likewise.

  CHES    = <S+, S-> - ||S+||^2                         = <S+, S- - S+>
  LN-CHES = <S+, S->/(|y+||y-|) - ||S+||^2/|y+|^2         = <m+, m- - m+>,  m = S/|y|,  |y| = mask count

Numerics: hidden states are cast to float32 BEFORE the masked sum (padding is excluded with `where`, so
garbage/inf at padded positions never enters). The score is evaluated in the difference form <S+, S- - S+>,
which avoids the catastrophic cancellation of subtracting two ~1e13 numbers, and on vectors rescaled by
c = max(|S+|_inf, |S-|_inf) (result = c^2 <S+/c, (S- - S+)/c>), so no intermediate can overflow unless the
true score itself exceeds the float32 range (~3e38). For d=4096, 1000 tokens and entries up to 50,
||S+||^2 is at most ~1e13 (measured ~9e11 in tests/test_ches.py, relative error vs float64 ~1e-7): far inside
float32, but far beyond float16's 65504, the range the official code overflowed on Llama-3-8B.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from displacement_jax.errors import check_array, describe


def _check_pair(hidden_chosen_BTD, hidden_rejected_BTD, mask_chosen_BT, mask_rejected_BT, mask_names) -> None:
  check_array("hidden_chosen_BTD", hidden_chosen_BTD, rank=3, kind="floating")
  check_array("hidden_rejected_BTD", hidden_rejected_BTD, rank=3, kind="floating")
  bc, _, dc = hidden_chosen_BTD.shape
  br, _, dr = hidden_rejected_BTD.shape
  if (bc, dc) != (br, dr):
    raise ValueError(
        f"hidden_chosen_BTD ({describe(hidden_chosen_BTD)}) and hidden_rejected_BTD "
        f"({describe(hidden_rejected_BTD)}) must agree on batch B and hidden size D"
    )
  check_array(mask_names[0], mask_chosen_BT, shape=tuple(hidden_chosen_BTD.shape[:2]), kind="mask")
  check_array(mask_names[1], mask_rejected_BT, shape=tuple(hidden_rejected_BTD.shape[:2]), kind="mask")


def _masked_sum_f32(hidden_BTD, mask_BT) -> tuple[jax.Array, jax.Array]:
  """(sum_t mask * h in float32 -> [B, D], mask count -> [B] float32)."""
  mask_BT = jnp.asarray(mask_BT).astype(bool)
  h_BTD = jnp.asarray(hidden_BTD).astype(jnp.float32)
  s_BD = jnp.sum(jnp.where(mask_BT[..., None], h_BTD, 0.0), axis=1)
  return s_BD, jnp.sum(mask_BT, axis=1, dtype=jnp.float32)


def _scaled_inner(a_BD, b_BD) -> jax.Array:
  """<a, b> per row, computed on a/c and b/c with c = max(|a|_inf, |b|_inf) and multiplied back by c^2."""
  c_B = jnp.maximum(jnp.max(jnp.abs(a_BD), axis=-1), jnp.max(jnp.abs(b_BD), axis=-1))
  c_B = jnp.where(c_B > 0, c_B, 1.0)
  inner_B = jnp.einsum("bd,bd->b", a_BD / c_B[:, None], b_BD / c_B[:, None], precision=jax.lax.Precision.HIGHEST)
  return inner_B * c_B * c_B


def ches_components(
    hidden_chosen_BTD: jax.Array, hidden_rejected_BTD: jax.Array, mask_chosen_BT: jax.Array, mask_rejected_BT: jax.Array
) -> dict[str, jax.Array]:
  """All CHES ingredients, each [B] float32.

  Keys: 'ches', 'ln_ches', 'inner' <S+,S->, 'chosen_sq_norm' ||S+||^2, 'rejected_sq_norm' ||S-||^2,
  'chosen_len' |y+|, 'rejected_len' |y-|, 'cosine' <S+,S->/(||S+|| ||S-||). T may differ between the sides.
  LN-CHES is NaN for a row whose mask is empty (|y| = 0 is undefined).
  """
  _check_pair(
      hidden_chosen_BTD, hidden_rejected_BTD, mask_chosen_BT, mask_rejected_BT, ("mask_chosen_BT", "mask_rejected_BT")
  )
  s_pos_BD, n_pos_B = _masked_sum_f32(hidden_chosen_BTD, mask_chosen_BT)
  s_neg_BD, n_neg_B = _masked_sum_f32(hidden_rejected_BTD, mask_rejected_BT)
  ches_B = _scaled_inner(s_pos_BD, s_neg_BD - s_pos_BD)
  safe_pos_B, safe_neg_B = jnp.where(n_pos_B > 0, n_pos_B, 1.0), jnp.where(n_neg_B > 0, n_neg_B, 1.0)
  m_pos_BD, m_neg_BD = s_pos_BD / safe_pos_B[:, None], s_neg_BD / safe_neg_B[:, None]
  ln_ches_B = jnp.where((n_pos_B > 0) & (n_neg_B > 0), _scaled_inner(m_pos_BD, m_neg_BD - m_pos_BD), jnp.nan)
  inner_B = _scaled_inner(s_pos_BD, s_neg_BD)
  pos_sq_B, neg_sq_B = _scaled_inner(s_pos_BD, s_pos_BD), _scaled_inner(s_neg_BD, s_neg_BD)
  denom_B = jnp.sqrt(pos_sq_B) * jnp.sqrt(neg_sq_B)
  return {
      "ches": ches_B,
      "ln_ches": ln_ches_B,
      "inner": inner_B,
      "chosen_sq_norm": pos_sq_B,
      "rejected_sq_norm": neg_sq_B,
      "chosen_len": n_pos_B,
      "rejected_len": n_neg_B,
      "cosine": inner_B / jnp.where(denom_B > 0, denom_B, 1.0),
  }


def ches_scores(
    hidden_chosen_BTD: jax.Array,
    hidden_rejected_BTD: jax.Array,
    mask_chosen_BT: jax.Array,
    mask_rejected_BT: jax.Array,
    *,
    length_normalized: bool = False,
) -> jax.Array:
  """CHES (or LN-CHES when length_normalized) per pair -> [B] float32. Higher => more displacement.

  Masks select the positions whose hidden state predicts a response token (the batch's `loss_mask`); any
  padding side, different T for chosen/rejected, any float dtype (cast to float32 before summing).
  """
  comps = ches_components(hidden_chosen_BTD, hidden_rejected_BTD, mask_chosen_BT, mask_rejected_BT)
  return comps["ln_ches" if length_normalized else "ches"]


def last_hidden_inner_product(
    hidden_chosen_BTD: jax.Array,
    hidden_rejected_BTD: jax.Array,
    attention_mask_chosen_BT: jax.Array,
    attention_mask_rejected_BT: jax.Array,
) -> jax.Array:
  """<h at the last real position of (x, y+), h at the last real position of (x, y-)> -> [B] float32.

  "Last real position" = the last True of the attention mask (any padding side). NaN for an all-False row.
  """
  _check_pair(
      hidden_chosen_BTD,
      hidden_rejected_BTD,
      attention_mask_chosen_BT,
      attention_mask_rejected_BT,
      ("attention_mask_chosen_BT", "attention_mask_rejected_BT"),
  )

  def last(hidden_BTD, mask_BT):
    mask_BT = jnp.asarray(mask_BT).astype(bool)
    t = mask_BT.shape[1]
    idx_B = t - 1 - jnp.argmax(mask_BT[:, ::-1], axis=1)
    h_BD = jnp.take_along_axis(jnp.asarray(hidden_BTD), idx_B[:, None, None], axis=1)[:, 0]
    return h_BD.astype(jnp.float32), jnp.any(mask_BT, axis=1)

  h_pos_BD, ok_pos_B = last(hidden_chosen_BTD, attention_mask_chosen_BT)
  h_neg_BD, ok_neg_B = last(hidden_rejected_BTD, attention_mask_rejected_BT)
  return jnp.where(ok_pos_B & ok_neg_B, _scaled_inner(h_pos_BD, h_neg_BD), jnp.nan)


def without_last_position(mask_BT: jax.Array, drop_B: jax.Array) -> jax.Array:
  """`mask_BT` with its last True removed in the rows where `drop_B` is True (any padding side).

  The last-hidden measure uses it to go from "last real position" to "last response token" when the row ends
  with an appended EOS: the state there is the one that predicts EOS (the authors' position).
  """
  mask_BT = jnp.asarray(mask_BT).astype(bool)
  t = mask_BT.shape[1]
  last_B = t - 1 - jnp.argmax(mask_BT[:, ::-1], axis=1)
  is_last_BT = jnp.arange(t)[None, :] == last_B[:, None]
  return mask_BT & ~(is_last_BT & jnp.asarray(drop_B, bool)[:, None])


def levenshtein(ids_a: Sequence[int] | np.ndarray, ids_b: Sequence[int] | np.ndarray) -> int:
  """Edit distance (unit insert/delete/substitute) between two token-id sequences; numpy DP by rows.

  Each row is vectorised: substitution/deletion elementwise, then insertions via the identity
  row[j] = min_k<=j (tmp[k] + j - k) = j + cummin(tmp - arange)[j].
  """
  a = np.asarray(ids_a).reshape(-1)
  b = np.asarray(ids_b).reshape(-1)
  if len(a) < len(b):
    a, b = b, a  # rows over the longer sequence, vectors over the shorter one
  if len(b) == 0:
    return int(len(a))
  ar = np.arange(len(b) + 1)
  row = ar.copy()
  for i, tok in enumerate(a, start=1):
    tmp = np.empty_like(row)
    tmp[0] = i
    # deletion (row[1:] + 1) or substitution/match (row[:-1] + cost)
    tmp[1:] = np.minimum(row[1:] + 1, row[:-1] + (b != tok))
    row = np.minimum.accumulate(tmp - ar) + ar
  return int(row[-1])


def minus_normalized_edit_distance(ids_a: Sequence[int] | np.ndarray, ids_b: Sequence[int] | np.ndarray) -> float:
  """-Levenshtein(ids_a, ids_b) / max(len(ids_a), len(ids_b)); 0.0 when both are empty. In [-1, 0]."""
  for name, ids in (("ids_a", ids_a), ("ids_b", ids_b)):
    arr = np.asarray(ids)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
      raise ValueError(f"{name} must be a 1-D sequence of integer token ids, got {describe(arr)}")
  n = max(len(ids_a), len(ids_b))
  return 0.0 if n == 0 else -levenshtein(ids_a, ids_b) / n


def minus_normalized_edit_distance_batch(
    ids_a_list: Sequence[Sequence[int]], ids_b_list: Sequence[Sequence[int]], *, progress: bool = False
) -> np.ndarray:
  """minus_normalized_edit_distance for each pair of two equal-length lists -> [N] float32."""
  if len(ids_a_list) != len(ids_b_list):
    raise ValueError(
        f"ids_a_list and ids_b_list must have the same length, got {len(ids_a_list)} " f"and {len(ids_b_list)}"
    )
  pairs = zip(ids_a_list, ids_b_list)
  if progress:
    pairs = tqdm(pairs, total=len(ids_a_list), desc="edit distance")
  return np.asarray([minus_normalized_edit_distance(a, b) for a, b in pairs], dtype=np.float32)
