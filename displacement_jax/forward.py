"""Model-side pure functions shared by every entry point: hidden states, log-probs, next-token distributions.

Each is a function of (model, params, batch) that callers jit (with mesh shardings). Log-probs go through
`logprobs.chunked_*` on the final hidden states, so no float32 [B, T, V] tensor is materialised. A batch is
either the two-side collated layout or the shared-prompt packed one (data/packing.py); `pair_logps` takes both.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from displacement_jax import logprobs as logprobs_lib
from displacement_jax.data import packing
from displacement_jax.models.transformer import unembedding

SIDES = ("chosen", "rejected")


def forward_hidden(model: Any, params: Any, input_ids_BT: jax.Array, attention_mask_BT: jax.Array) -> jax.Array:
  """Final-norm hidden states [B, T, D] (the LM-head input) without computing logits."""
  out = model.apply({"params": params}, input_ids_BT, attention_mask_BT, return_logits=False, return_hidden=True)
  return out.hidden_BTD


def unembed(model: Any, params: Any) -> jax.Array:
  """The [D, V] unembedding matrix of `model` (transposed embedding when tied)."""
  return unembedding(params, model.config)


def side_logps(
    model: Any, params: Any, batch: dict[str, jax.Array], side: str, chunk_size: int
) -> tuple[jax.Array, jax.Array]:
  """(summed response log-probs [B], summed mean-over-vocab logits [B]) of one side ('chosen' | 'rejected') of a
  collated batch, both float32 over the side's loss-mask positions."""
  hidden_BTD = forward_hidden(model, params, batch[f"{side}_input_ids_BT"], batch[f"{side}_attention_mask_BT"])
  unembed_DV = unembed(model, params)
  logps_B = logprobs_lib.chunked_sequence_logprobs(
      hidden_BTD, unembed_DV, batch[f"{side}_labels_BT"], batch[f"{side}_loss_mask_BT"], chunk_size=chunk_size
  )
  return logps_B, jnp.sum(jnp.where(batch[f"{side}_loss_mask_BT"], mean_logit(hidden_BTD, unembed_DV), 0.0), axis=-1)


def mean_logit(hidden_BTD: jax.Array, unembed_DV: jax.Array) -> jax.Array:
  """Mean over the vocabulary of the logits at each position, [B, T] float32, without forming the logits:
  mean_v <h, W_v> = <h, mean_v W_v>."""
  return jnp.einsum("btd,d->bt", hidden_BTD.astype(jnp.float32), jnp.mean(unembed_DV.astype(jnp.float32), axis=1))


def token_count(batch: dict[str, jax.Array]) -> jax.Array:
  """Non-padding tokens of the chosen and the rejected sequences of a batch (prompt counted on both sides, as
  TRL's num_tokens counts them), int32 scalar, for either layout."""
  if packing.is_packed(batch):
    branch_BT = batch["packed_branch_BT"]
    return jnp.sum(branch_BT >= 0, dtype=jnp.int32) + jnp.sum(branch_BT == packing.PROMPT, dtype=jnp.int32)
  return sum(jnp.sum(batch[f"{side}_attention_mask_BT"], dtype=jnp.int32) for side in SIDES)


def packed_forward_hidden(model: Any, params: Any, batch: dict[str, jax.Array]) -> jax.Array:
  """Final-norm hidden states [B, T, D] of a shared-prompt packed batch (data/packing.py)."""
  branch_BT = batch["packed_branch_BT"]
  out = model.apply(
      {"params": params},
      batch["packed_input_ids_BT"],
      branch_BT >= 0,
      positions_BT=batch["packed_positions_BT"],
      branch_BT=branch_BT,
      segment_BT=batch.get("packed_segment_BT"),
      return_logits=False,
      return_hidden=True,
  )
  return out.hidden_BTD


def response_hidden(hidden_BTD: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
  """Hidden states [B, R, D] at the packed batch's response slots (the LM-head inputs that matter)."""
  return jnp.take_along_axis(hidden_BTD, batch["response_slot_BR"][..., None], axis=1)


def packed_response_logps(
    model: Any, params: Any, batch: dict[str, jax.Array], chunk_size: int
) -> tuple[jax.Array, jax.Array]:
  """(log-probs [B, R] float32 of a packed batch's response labels, 0 on empty slots; the LM-head inputs [B, R, D]
  at those slots): one forward, the LM head on the response slots only."""
  hidden_BRD = response_hidden(packed_forward_hidden(model, params, batch), batch)
  logps_BR = logprobs_lib.chunked_token_logprobs(
      hidden_BRD,
      unembed(model, params),
      batch["response_label_BR"],
      chunk_size=chunk_size,
      mask_BT=batch["response_side_BR"] > 0,
  )
  return logps_BR, hidden_BRD


def packed_pair_logps(model: Any, params: Any, batch: dict[str, jax.Array], chunk_size: int) -> dict[str, jax.Array]:
  """`pair_logps` of a packed batch: one forward, LM head on response slots only."""
  logps_BR, hidden_BRD = packed_response_logps(model, params, batch, chunk_size)
  mean_BR = mean_logit(hidden_BRD, unembed(model, params))
  out = {}
  for k, side in enumerate(SIDES, start=1):
    out[f"{side}_logps_B"] = per_pair_sum(logps_BR, batch, k)
    out[f"{side}_logit_sum_B"] = per_pair_sum(mean_BR, batch, k)
  return out


def per_pair_sum(values_BR: jax.Array, batch: dict[str, jax.Array], side: int) -> jax.Array:
  """[P] float32 sums of `values_BR` over each pair's response slots of `side` (packing.CHOSEN / REJECTED) in a
  packed batch: a segment sum over response_pair_BR (a row may hold several pairs)."""
  num_pairs = batch["index_B"].shape[0]
  pair_BR = batch["response_pair_BR"]
  ids_BR = jnp.where((batch["response_side_BR"] == side) & (pair_BR >= 0), pair_BR, num_pairs)  # num_pairs: dropped
  values = jnp.where(ids_BR < num_pairs, values_BR, 0.0).astype(jnp.float32)
  return jax.ops.segment_sum(values.reshape(-1), ids_BR.reshape(-1), num_segments=num_pairs)


def pair_logps(model: Any, params: Any, batch: dict[str, jax.Array], chunk_size: int) -> dict[str, jax.Array]:
  """{'chosen_logps_B', 'rejected_logps_B'} (summed response log-probs) and {'chosen_logit_sum_B',
  'rejected_logit_sum_B'} (summed mean-over-vocab logits, for TRL's logits/* metrics) of a collated preference
  batch, two-side or packed, all [B] float32."""
  if packing.is_packed(batch):
    return packed_pair_logps(model, params, batch, chunk_size)
  out = {}
  for side in SIDES:
    out[f"{side}_logps_B"], out[f"{side}_logit_sum_B"] = side_logps(model, params, batch, side, chunk_size)
  return out


def last_prompt_position(loss_mask_BT: jax.Array) -> jax.Array:
  """Index [B] of the first loss position (the last prompt token: in single-token mode the only one)."""
  return jnp.argmax(loss_mask_BT.astype(jnp.int32), axis=-1)


def next_token_outputs(model: Any, params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Single-token mode: hidden state h_BD, next-token probabilities prob_BV and log-probs logp_BV (float32) at the
  last prompt position.

  Uses the chosen side (the prompt is identical on both sides). Only [B, V] is materialised.
  """
  hidden_BTD = forward_hidden(model, params, batch["chosen_input_ids_BT"], batch["chosen_attention_mask_BT"])
  pos_B = last_prompt_position(batch["chosen_loss_mask_BT"])
  h_BD = jnp.take_along_axis(hidden_BTD, pos_B[:, None, None], axis=1)[:, 0].astype(jnp.float32)
  logits_BV = jnp.einsum("bd,dv->bv", h_BD, unembed(model, params).astype(jnp.float32))
  logp_BV = jax.nn.log_softmax(logits_BV, axis=-1)
  return {"h_BD": h_BD, "prob_BV": jnp.exp(logp_BV), "logp_BV": logp_BV}
