"""Per-token and per-sequence log-probabilities, in float32, optionally chunked through the LM head.

Convention (batch contract): the logits (or hidden state) at position t predict `labels_BT[:, t]`, and a
sequence log-prob sums `log pi(label_t)` over the positions where `mask_BT` is true (the `loss_mask`).

`chunked_token_logprobs` applies the unembedding and the log-softmax chunk by chunk (a `lax.scan` forward, a
custom VJP that recomputes each chunk's logits once backward), so neither pass holds a float32 [B, T, V]
buffer: peak extra memory is one [B, chunk_size, V] float32 block.

Labels must lie in [0, V). Out-of-range labels cannot be detected at trace time; `token_logprobs` returns NaN
at such positions (concrete numpy labels are checked eagerly), while the sequence functions ignore the label
wherever the mask is false (so HF's -100 at masked positions is harmless).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from displacement_jax.errors import check_array, describe

DEFAULT_CHUNK_SIZE = 128


def _check_labels_range(labels_BT, vocab_size: int) -> None:
  """Eager range check, only for concrete numpy labels (jax arrays/tracers are not pulled to host)."""
  if isinstance(labels_BT, np.ndarray) and labels_BT.size:
    lo, hi = int(labels_BT.min()), int(labels_BT.max())
    if lo < 0 or hi >= vocab_size:
      raise ValueError(f"labels_BT values must lie in [0, {vocab_size}), got min {lo} max {hi}")


def _check_masked_labels_range(labels_BT, mask_BT, vocab_size: int) -> None:
  """Eager range check of the labels where the mask is true, when both are concrete numpy arrays."""
  if isinstance(labels_BT, np.ndarray) and isinstance(mask_BT, np.ndarray):
    _check_labels_range(np.where(mask_BT.astype(bool), labels_BT, 0), vocab_size)


def _pick_logprobs(logits_BTV: jax.Array, labels_BT: jax.Array) -> jax.Array:
  """log softmax(logits)[label] in float32; NaN where the label is out of range."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  labels_BT = labels_BT.astype(jnp.int32)
  valid_BT = (labels_BT >= 0) & (labels_BT < logits_BTV.shape[-1])
  picked_BT = jnp.take_along_axis(logits_BTV, jnp.where(valid_BT, labels_BT, 0)[..., None], axis=-1)[..., 0]
  return jnp.where(valid_BT, picked_BT - lse_BT, jnp.nan)


def token_logprobs(logits_BTV: jax.Array, labels_BT: jax.Array) -> jax.Array:
  """log softmax(logits_BTV)[b, t, labels_BT[b, t]] -> [B, T] float32 (log-softmax computed in float32)."""
  check_array("logits_BTV", logits_BTV, rank=3, kind="floating")
  check_array("labels_BT", labels_BT, shape=tuple(logits_BTV.shape[:2]), kind="integer")
  _check_labels_range(labels_BT, logits_BTV.shape[-1])
  return _pick_logprobs(logits_BTV, jnp.asarray(labels_BT))


def _masked_sum(values_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
  return jnp.sum(jnp.where(mask_BT.astype(bool), values_BT, 0.0), axis=-1, dtype=jnp.float32)


def sequence_logprobs(logits_BTV: jax.Array, labels_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
  """sum_t mask[b, t] * log pi(labels[b, t] | logits[b, t]) -> [B] float32. Labels where mask is false are unused."""
  check_array("logits_BTV", logits_BTV, rank=3, kind="floating")
  check_array("labels_BT", labels_BT, shape=tuple(logits_BTV.shape[:2]), kind="integer")
  check_array("mask_BT", mask_BT, shape=tuple(logits_BTV.shape[:2]), kind="mask")
  _check_masked_labels_range(labels_BT, mask_BT, logits_BTV.shape[-1])
  mask_BT = jnp.asarray(mask_BT).astype(bool)
  safe_labels_BT = jnp.where(mask_BT, jnp.asarray(labels_BT), 0)
  return _masked_sum(_pick_logprobs(logits_BTV, safe_labels_BT), mask_BT)


def _check_chunked_args(hidden_BTD, unembed_DV, labels_BT, chunk_size) -> None:
  check_array("hidden_BTD", hidden_BTD, rank=3, kind="floating")
  check_array("unembed_DV", unembed_DV, rank=2, kind="floating")
  if unembed_DV.shape[0] != hidden_BTD.shape[-1]:
    raise ValueError(
        f"unembed_DV first dim must equal the hidden size D={hidden_BTD.shape[-1]} of hidden_BTD "
        f"({describe(hidden_BTD)}), got unembed_DV {describe(unembed_DV)}"
    )
  check_array("labels_BT", labels_BT, shape=tuple(hidden_BTD.shape[:2]), kind="integer")
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def _chunk_logits(h_ND: jax.Array, unembed_DV: jax.Array) -> jax.Array:
  return jnp.einsum("nd,dv->nv", h_ND, unembed_DV, preferred_element_type=jnp.float32)


def _chunk_forward(h_ND: jax.Array, unembed_DV: jax.Array, y_N: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(log pi(y) [N] with NaN for out-of-range labels, logsumexp [N]) of one chunk, float32."""
  logits_NV = _chunk_logits(h_ND, unembed_DV)
  max_N = jax.lax.stop_gradient(jnp.max(logits_NV, axis=-1))
  lse_N = max_N + jnp.log(jnp.sum(jnp.exp(logits_NV - max_N[:, None]), axis=-1))
  valid_N = (y_N >= 0) & (y_N < unembed_DV.shape[-1])
  picked_N = jnp.take_along_axis(logits_NV, jnp.where(valid_N, y_N, 0)[:, None], axis=-1)[:, 0]
  return jnp.where(valid_N, picked_N - lse_N, jnp.nan), lse_N


def _dead_chunk_forward(h_CD: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The forward's output for a skipped chunk: (log-probs, logsumexp) of zeros."""
  return jnp.zeros(h_CD.shape[:1], jnp.float32), jnp.zeros(h_CD.shape[:1], jnp.float32)


def _if_live(i: jax.Array, live_chunks: jax.Array | None, live: Callable[[], Any], dead: Callable[[], Any]) -> Any:
  """live() for chunk i < live_chunks (always when live_chunks is None), else dead()."""
  return live() if live_chunks is None else jax.lax.cond(i < live_chunks, live, dead)


@jax.custom_vjp
def _chunked_logprobs_KC(
    h_KCD: jax.Array, unembed_DV: jax.Array, y_KC: jax.Array, live_chunks: jax.Array | None
) -> jax.Array:
  """log pi(y) [K, C] of K chunks of C positions, scanned one [C, V] float32 block at a time; with a scalar
  `live_chunks`, only the first `live_chunks` chunks are computed (the rest give zeros), under `lax.cond`."""
  return _chunked_fwd(h_KCD, unembed_DV, y_KC, live_chunks)[0]


def _chunked_fwd(
    h_KCD: jax.Array, unembed_DV: jax.Array, y_KC: jax.Array, live_chunks: jax.Array | None
) -> tuple[jax.Array, tuple[Any, ...]]:
  """The custom VJP's forward: (log pi(y) [K, C], residuals: the inputs and the logsumexp [K, C])."""

  def one_chunk(i, args):
    h_CD, y_C = args
    out = _if_live(i, live_chunks, lambda: _chunk_forward(h_CD, unembed_DV, y_C), lambda: _dead_chunk_forward(h_CD))
    return i + 1, out

  _, (logp_KC, lse_KC) = jax.lax.scan(one_chunk, jnp.int32(0), (h_KCD, y_KC))
  return logp_KC, (h_KCD, unembed_DV, y_KC, live_chunks, lse_KC)  # residuals: the inputs and one float per position


def _chunked_bwd(res: tuple[Any, ...], g_KC: jax.Array) -> tuple[Any, ...]:
  """d log pi(y_n) / d logits_n = onehot(y_n) - softmax_n: each chunk's logits are recomputed once and give
  both cotangents (hidden: g (e_y - p) W^T; unembedding: accumulated h^T g (e_y - p), formed as [V, D],
  the layout XLA:CPU multiplies fastest). The softmax reuses the forward's logsumexp; dead chunks are skipped."""
  h_KCD, unembed_DV, y_KC, live_chunks, lse_KC = res
  v = unembed_DV.shape[-1]

  def live_chunk(d_unembed_VD, h_CD, y_C, lse_C, g_C):
    p_CV = jnp.exp(_chunk_logits(h_CD, unembed_DV) - lse_C[:, None])
    dlogits_CV = g_C[:, None] * (jax.nn.one_hot(y_C, v, dtype=jnp.float32) - p_CV)
    dh_CD = jnp.einsum("cv,dv->cd", dlogits_CV, unembed_DV, preferred_element_type=jnp.float32)
    d_unembed_VD = d_unembed_VD + jnp.einsum("cv,cd->vd", dlogits_CV, h_CD, preferred_element_type=jnp.float32)
    return d_unembed_VD, dh_CD.astype(h_CD.dtype)

  def one_chunk(carry, args):
    d_unembed_VD, i = carry
    h_CD, y_C, lse_C, g_C = args
    dead = lambda: (d_unembed_VD, jnp.zeros_like(h_CD))
    d_unembed_VD, dh_CD = _if_live(i, live_chunks, lambda: live_chunk(d_unembed_VD, h_CD, y_C, lse_C, g_C), dead)
    return (d_unembed_VD, i + 1), dh_CD

  g_KC = jnp.where((y_KC >= 0) & (y_KC < v), g_KC, 0.0)  # out-of-range labels: a NaN constant, no gradient
  zeros_VD = jnp.zeros((v, unembed_DV.shape[0]), jnp.float32)
  init = (zeros_VD, jnp.int32(0))
  (d_unembed_VD, _), dh_KCD = jax.lax.scan(one_chunk, init, (h_KCD, y_KC, lse_KC, g_KC.astype(jnp.float32)))
  return dh_KCD, d_unembed_VD.T.astype(unembed_DV.dtype), None, None


_chunked_logprobs_KC.defvjp(_chunked_fwd, _chunked_bwd)


def chunked_token_logprobs(
    hidden_BTD: jax.Array,
    unembed_DV: jax.Array,
    labels_BT: jax.Array,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    mask_BT: jax.Array | None = None,
) -> jax.Array:
  """log softmax(hidden_BTD @ unembed_DV)[labels_BT] -> [B, T] float32, never holding a float32 [B, T, V] block.

  The B x T positions are flattened and cut into chunks of B * chunk_size positions (the last one zero-padded),
  so peak extra memory is one [B, chunk_size, V] float32 block, in the forward and in the backward pass. With
  `mask_BT`, the positions it keeps are moved to the front first and the chunks that hold none of them are
  skipped at run time (in both passes; on a single device, see below): padding costs no LM-head work beyond the
  last live chunk, and masked positions give 0. The matmul accumulates in float32 (`preferred_element_type`):
  bf16 hidden/unembedding give the logits of a bf16 model whose LM head returns float32 logits. The backward
  pass is a custom VJP that recomputes each chunk's logits once and forms both cotangents from them (4 matmuls
  per chunk in all, one exp pass in the backward; autodiff of a rematerialised chunk also differentiates the
  logsumexp). Reverse mode only: `jax.jvp` through this function is not supported (jax.custom_vjp).
  """
  _check_chunked_args(hidden_BTD, unembed_DV, labels_BT, chunk_size)
  if mask_BT is not None:
    check_array("mask_BT", mask_BT, shape=tuple(hidden_BTD.shape[:2]), kind="mask")
    _check_masked_labels_range(labels_BT, mask_BT, unembed_DV.shape[-1])
  else:
    _check_labels_range(labels_BT, unembed_DV.shape[-1])
  hidden_BTD, unembed_DV, labels_BT = map(jnp.asarray, (hidden_BTD, unembed_DV, labels_BT))
  b, t, d = hidden_BTD.shape
  n = b * t
  c = max(min(int(chunk_size) * b, n), 1)
  k = -(-n // c)
  pad = k * c - n
  h_ND, y_N = hidden_BTD.reshape(n, d), labels_BT.astype(jnp.int32).reshape(n)
  live_N = jnp.ones((n,), bool) if mask_BT is None else jnp.asarray(mask_BT).astype(bool).reshape(n)
  y_N = jnp.where(live_N, y_N, 0)
  if mask_BT is not None:  # masked positions give 0 and no gradient, even where their hidden state is NaN/inf
    h_ND = jnp.where(live_N[:, None], h_ND, jnp.zeros((), h_ND.dtype))
  # The skip runs on one device only: on an 8-device CPU mesh, collectives inside its lax.cond deadlocked
  # XLA (all-reduce rendezvous: 7 of 8 devices arrived), whatever the predicate's sharding.
  skip = mask_BT is not None and jax.device_count() == 1
  if skip:
    order_N = jnp.argsort(~live_N, stable=True)  # kept positions first, in order
    h_ND, y_N, live_N = h_ND[order_N], y_N[order_N], live_N[order_N]
  h_KCD = jnp.pad(h_ND, ((0, pad), (0, 0))).reshape(k, c, d)
  y_KC = jnp.pad(y_N, (0, pad)).reshape(k, c)
  live_chunks = -(-jnp.sum(live_N, dtype=jnp.int32) // c) if skip else None  # kept positions are at the front
  logp_N = jnp.where(live_N, _chunked_logprobs_KC(h_KCD, unembed_DV, y_KC, live_chunks).reshape(k * c)[:n], 0.0)
  if not skip:
    return logp_N.reshape(b, t)
  return jnp.zeros((n,), jnp.float32).at[order_N].set(logp_N, unique_indices=True).reshape(b, t)


def chunked_sequence_logprobs(
    hidden_BTD: jax.Array,
    unembed_DV: jax.Array,
    labels_BT: jax.Array,
    mask_BT: jax.Array,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> jax.Array:
  """sum over mask of chunked_token_logprobs -> [B] float32. Labels where mask is false are unused."""
  _check_chunked_args(hidden_BTD, unembed_DV, labels_BT, chunk_size)
  check_array("mask_BT", mask_BT, shape=tuple(hidden_BTD.shape[:2]), kind="mask")
  _check_masked_labels_range(labels_BT, mask_BT, unembed_DV.shape[-1])
  mask_BT = jnp.asarray(mask_BT).astype(bool)
  logp_BT = chunked_token_logprobs(hidden_BTD, unembed_DV, labels_BT, chunk_size=chunk_size, mask_BT=mask_BT)
  return _masked_sum(logp_BT, mask_BT)
