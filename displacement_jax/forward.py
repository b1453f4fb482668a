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

SIDES = ('chosen', 'rejected')

def forward_hidden(model: Any, params: Any, input_ids_BT: jax.Array, attention_mask_BT: jax.Array) -> jax.Array:
  """Final-norm hidden states [B, T, D] (the LM-head input) without computing logits."""
  out = model.apply({'params': params}, input_ids_BT, attention_mask_BT, return_logits=False, return_hidden=True)
  return out.hidden_BTD


def unembed(model: Any, params: Any) -> jax.Array:
  """The [D, V] unembedding matrix of `model` (transposed embedding when tied)."""
  return unembedding(params, model.config)


def side_logps(model: Any, params: Any, batch: dict[str, jax.Array], side: str, chunk_size: int) -> jax.Array:
  """Summed response log-probs [B] (float32) of one side ('chosen' | 'rejected') of a collated batch."""
  hidden_BTD = forward_hidden(model, params, batch[f'{side}_input_ids_BT'], batch[f'{side}_attention_mask_BT'])
  return logprobs_lib.chunked_sequence_logprobs(hidden_BTD, unembed(model, params), batch[f'{side}_labels_BT'],
                                                batch[f'{side}_loss_mask_BT'], chunk_size=chunk_size)


def packed_forward_hidden(model: Any, params: Any, batch: dict[str, jax.Array]) -> jax.Array:
  """Final-norm hidden states [B, T, D] of a shared-prompt packed batch (data/packing.py)."""
  branch_BT = batch['packed_branch_BT']
  out = model.apply({'params': params}, batch['packed_input_ids_BT'], branch_BT >= 0,
                    positions_BT=batch['packed_positions_BT'], branch_BT=branch_BT, return_logits=False,
                    return_hidden=True)
  return out.hidden_BTD


def response_hidden(hidden_BTD: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
  """Hidden states [B, R, D] at the packed batch's response slots (the LM-head inputs that matter)."""
  return jnp.take_along_axis(hidden_BTD, batch['response_slot_BR'][..., None], axis=1)


def packed_pair_logps(model: Any, params: Any, batch: dict[str, jax.Array], chunk_size: int
                      ) -> dict[str, jax.Array]:
  """{'chosen_logps_B', 'rejected_logps_B'} of a packed batch: one forward, LM head on response slots only."""
  hidden_BRD = response_hidden(packed_forward_hidden(model, params, batch), batch)
  side_BR = batch['response_side_BR']
  logps_BR = logprobs_lib.chunked_token_logprobs(hidden_BRD, unembed(model, params),
                                                 jnp.where(side_BR > 0, batch['response_label_BR'], 0),
                                                 chunk_size=chunk_size)
  return {f'{side}_logps_B': jnp.sum(jnp.where(side_BR == k, logps_BR, 0.0), axis=-1)
          for k, side in enumerate(SIDES, start=1)}


def pair_logps(model: Any, params: Any, batch: dict[str, jax.Array], chunk_size: int) -> dict[str, jax.Array]:
  """{'chosen_logps_B', 'rejected_logps_B'} of a collated preference batch, two-side or packed."""
  if packing.is_packed(batch):
    return packed_pair_logps(model, params, batch, chunk_size)
  return {f'{side}_logps_B': side_logps(model, params, batch, side, chunk_size) for side in SIDES}


def last_prompt_position(loss_mask_BT: jax.Array) -> jax.Array:
  """Index [B] of the first loss position (the last prompt token: in single-token mode the only one)."""
  return jnp.argmax(loss_mask_BT.astype(jnp.int32), axis=-1)


def next_token_outputs(model: Any, params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Single-token mode: hidden state h_BD and next-token probabilities p_BV at the last prompt position.

  Uses the chosen side (the prompt is identical on both sides). Only [B, V] is materialised.
  """
  hidden_BTD = forward_hidden(model, params, batch['chosen_input_ids_BT'], batch['chosen_attention_mask_BT'])
  pos_B = last_prompt_position(batch['chosen_loss_mask_BT'])
  h_BD = jnp.take_along_axis(hidden_BTD, pos_B[:, None, None], axis=1)[:, 0].astype(jnp.float32)
  logits_BV = jnp.einsum('bd,dv->bv', h_BD, unembed(model, params).astype(jnp.float32))
  return {'h_BD': h_BD, 'prob_BV': jax.nn.softmax(logits_BV, axis=-1)}
