"""Pure pieces of preference training: train state, sequence log-probs from hidden states, loss, train step.

Everything here is a function of (params, batch) that the CLI in `displacement_jax.train` jits with
mesh shardings. Log-probs go through `logprobs.chunked_sequence_logprobs` on the final hidden states,
so no float32 [B, T, V] tensor is materialised. Reference log-probs arrive in the batch
(`chosen_ref_logps_B`, `rejected_ref_logps_B`), computed once before training.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from displacement_jax import logprobs as logprobs_lib
from displacement_jax import monitor
from displacement_jax import optim as optim_lib
from displacement_jax.data import packing

SIDES = ('chosen', 'rejected')


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint needs to continue training exactly (besides the data-iterator state)."""
  params: Any
  opt_state: Any
  step: jax.Array     # int32 scalar: optimizer steps taken
  rng: jax.Array      # uint32[2] raw key data (no dropout today; kept so resumed runs stay reproducible)


def forward_hidden(model: Any, params: Any, input_ids_BT: jax.Array, attention_mask_BT: jax.Array) -> jax.Array:
  """Final-norm hidden states [B, T, D] (the LM-head input) without computing logits."""
  out = model.apply({'params': params}, input_ids_BT, attention_mask_BT, return_logits=False, return_hidden=True)
  return out.hidden_BTD


def unembed(model: Any, params: Any) -> jax.Array:
  """The [D, V] unembedding matrix of `model` (transposed embedding when tied)."""
  from displacement_jax.models import unembedding  # pylint: disable=g-import-not-at-top

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


def make_loss_fn(model: Any, loss_config: Any, chunk_size: int
                 ) -> Callable[[Any, dict[str, jax.Array]], tuple[jax.Array, dict[str, jax.Array]]]:
  """loss_fn(params, batch) -> (scalar loss, metrics): the configured preference objective."""
  from displacement_jax import losses  # pylint: disable=g-import-not-at-top

  def loss_fn(params, batch):
    logps = pair_logps(model, params, batch, chunk_size)
    pc, pr = logps['chosen_logps_B'], logps['rejected_logps_B']
    rc, rr = batch['chosen_ref_logps_B'], batch['rejected_ref_logps_B']
    loss, core_metrics = preference_loss(losses, loss_config, pc, pr, rc, rr)
    aux = {
        **{k: v for k, v in core_metrics.items() if k != 'loss'},
        'chosen_logps': jnp.mean(pc),
        'rejected_logps': jnp.mean(pr),
        'preferred_change': jnp.mean(pc - rc),
        'dispreferred_change': jnp.mean(pr - rr),
        'reward_accuracy': jnp.mean(((pc - rc) > (pr - rr)).astype(jnp.float32)),
        'share_preferred_fell': jnp.mean(monitor.fell(pc - rc, rc, xp=jnp).astype(jnp.float32)),
    }
    return loss, aux

  return loss_fn


def preference_loss(losses: Any, loss_config: Any, pc: jax.Array, pr: jax.Array, rc: jax.Array,
                    rr: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(loss, metrics) of `losses.preference_loss` with the fields of `loss_config` (configs/base.py `loss`)."""
  return losses.preference_loss(
      loss_config.objective, pc, pr, rc, rr,
      beta=float(loss_config.beta),
      sft_coeff=float(loss_config.get('sft_coeff', 0.0)),
      label_smoothing=float(loss_config.get('label_smoothing', 0.0)),
      slic_delta=float(loss_config.get('slic_delta', 1.0)),
      dpop_lambda=float(loss_config.get('dpop_lambda', 50.0)),
      gpo_fn=loss_config.get('gpo_fn', 'logistic'))


def make_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation, grad_accum: int
                    ) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
  """train_step(state, batch) -> (new state, metrics); gradients averaged over `grad_accum` micro-batches.

  When the loss is NaN/inf the update is skipped (the returned state equals the input state), so a caller
  that donates the state can still checkpoint the last good state before stopping.
  """

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    loss, aux, grads = optim_lib.accumulate_gradients(loss_fn, state.params, batch, grad_accum)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads), **aux}
    new_state = state.replace(params=params, opt_state=opt_state, step=state.step + 1,
                              rng=jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(state.rng), 0)))
    finite = jnp.isfinite(loss)
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    return new_state, metrics

  return train_step


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
