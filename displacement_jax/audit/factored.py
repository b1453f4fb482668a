"""Per-pair sketches on 'head_and_last_layers' with the LM head's gradient kept as factors, never as a matrix.

A pair's gradient of ln pi(y) on the head is a sum of outer products (logprobs.py's backward):

  untied head U [D, V]   sum_r h_r (e_r - p_r)^T                 h_r: the head's input at response slot r,
  tied embedding [V, D]  sum_r (e_r - p_r) h_r^T                 p_r: softmax(h_r U), e_r: one-hot of the label
                         + sum_t e(x_t) dx_t^T                   (the input lookup: dx_t the cotangent of the
                                                                  embedding row of input token x_t)

over the side's response slots (and, tied, every input position). `make_chunk_sketches` (audit/decompose.py)
differentiated the whole head and count-sketched its [V, D] gradient per side (1.03 s per pair on SmolLM2 at k
4096; 0.64 s this way, with the cut split once: BENCHMARKS.md). Here the head is held fixed in the backward (no
head gradient is formed), h_r and the lookup cotangents come out of it, and the head's S a and S b are projected
from the factors (`sketch.outer_project`, count-sketch's outer hash of the head). Only the third vector, S(W * g)
with W the per-coordinate preconditioner, needs g on the head's coordinates: it is formed once per pair (one
[V, D] matrix, not one per side) and projected. The rest of the subspace (the last layers, the final norm) comes
out of the same backward as dense gradients, projected by the caller as on the whole model's route. The values are
the dense path's (tests/test_audit.py: equal to `make_chunk_sketches`' whole-model route).

Applies to count-sketch on 'head_and_last_layers' over a packed batch (data/packing.py) of full-parameter runs,
where `truncated.applies`; the rest goes the dense way. Memory per pair: p_r for the pair's response slots
([R, V] float32 per side) and one [V, D] matrix.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from displacement_jax import forward
from displacement_jax.audit import sketch, truncated


def applies(config: Any, subspace: str, last_layers: int, projection: str, packed: bool) -> bool:
  """Whether `pair_parts` serves a full-parameter run: count-sketch, the cut of `truncated.applies`, a packed
  batch (LoRA runs differentiate their adapters through the whole model instead)."""
  return projection == "count_sketch" and packed and truncated.applies(config, subspace, last_layers)


def _slot_cotangents(hidden_RD: jax.Array, unembed_DV: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
  """[2, R, V] float32: d ln pi(y_side) / d logits at each response slot of the row's pair 0 (e_r - p_r on the
  side's slots, 0 elsewhere), sides chosen and rejected."""
  logits_RV = jnp.einsum("rd,dv->rv", hidden_RD.astype(jnp.float32), unembed_DV.astype(jnp.float32))
  label_R = batch["response_label_BR"][0]
  onehot_RV = jax.nn.one_hot(label_R, logits_RV.shape[-1], dtype=jnp.float32)
  cotangent_RV = onehot_RV - jax.nn.softmax(logits_RV, axis=-1)
  side_R, pair_R = batch["response_side_BR"][0], batch["response_pair_BR"][0]
  keep_2R = jnp.stack([(side_R == side) & (pair_R == 0) for side in (1, 2)])
  return jnp.where(keep_2R[..., None], cotangent_RV[None], 0.0)


def pair_parts(
    net: truncated.StackedModel,
    free: dict[str, Any],
    batch: dict[str, jax.Array],
    chunk_size: int,
    dloss_2: jax.Array,
    weight: Any,
    bits: dict[str, Any],
    s: Any,
) -> tuple[dict[str, jax.Array], dict[str, jax.Array], jax.Array]:
  """(a, b, head [3, k]) of the one pair in `batch` (a packed one-row batch whose pair is pair 0): a / b = grad
  ln pi(y+ / y-) on the subspace but the head (`sketch.select`'s leaves: the last layers, the final norm), dense;
  and the head's S a, S b, S(W * (dl/ds_w a + dl/ds_l b)) from its factors. `free` the differentiated params
  (`truncated.split`), `weight` W (a subspace dict or a scalar), `bits` count-sketch's draw of the subspace."""
  config = net.config
  head = truncated.head_key(config)
  tied = bool(config.tie_word_embeddings)
  head_params = jax.lax.stop_gradient(free[head])
  rest = {key: value for key, value in free.items() if key != head}
  ids_BT = batch["packed_input_ids_BT"]
  dtype = jnp.dtype(config.dtype)
  lookup_BTD = jnp.take(head_params["embedding"].astype(dtype), ids_BT, axis=0) if tied else None

  def logps(rest, lookup_BTD):
    params = {**rest, head: head_params}
    logps_BR, hidden_BRD = forward.packed_response_logps(
        dataclasses.replace(net, lookup_BTD=lookup_BTD), params, batch, chunk_size
    )
    sides = jnp.stack([forward.per_pair_sum(logps_BR, batch, side)[0] for side in (1, 2)])
    return sides, hidden_BRD[0]

  _, vjp, hidden_RD = jax.vjp(logps, rest, lookup_BTD, has_aux=True)
  rest_grads, lookup_grads = jax.vmap(lambda ct: vjp(ct))(jnp.eye(2, dtype=jnp.float32))

  a, b = (sketch.select(jax.tree.map(lambda x: x[side], rest_grads), s.subspace, s.last_layers) for side in range(2))

  # the head: factors
  name = "embed_tokens/embedding" if tied else "lm_head/kernel"
  k, head_bits = s.sketch_dim, bits[name]
  unembed_DV = forward.unembed(net, {head: head_params})
  cotangent_2RV = _slot_cotangents(hidden_RD, unembed_DV, batch)
  ids_T = ids_BT[0]
  projected = []
  for side in range(2):
    if tied:  # rows: the vocabulary; the slots' cotangents, and the input ids' lookup rows
      lookup = (ids_T, lookup_grads[side][0])
      projected.append(sketch.outer_project(cotangent_2RV[side], hidden_RD, head_bits, k, lookup))
    else:
      projected.append(sketch.outer_project(hidden_RD, cotangent_2RV[side], head_bits, k))
  g_RV = dloss_2[0] * cotangent_2RV[0] + dloss_2[1] * cotangent_2RV[1]
  if tied:
    g_dense = jnp.einsum("rv,rd->vd", g_RV, hidden_RD.astype(jnp.float32))
    g_lookup_TD = dloss_2[0] * lookup_grads[0][0] + dloss_2[1] * lookup_grads[1][0]
    g_dense = g_dense.at[ids_T].add(g_lookup_TD.astype(jnp.float32))
  else:
    g_dense = jnp.einsum("rd,rv->dv", hidden_RD.astype(jnp.float32), g_RV)
  w = weight[name] if isinstance(weight, dict) else weight
  projected.append(sketch.project({name: w * g_dense}, "count_sketch", k, s.sketch_seed, {name: head_bits}))
  return a, b, jnp.stack(projected)
