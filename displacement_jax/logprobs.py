"""Per-token and per-sequence log-probabilities, in float32, optionally chunked through the LM head.

Convention (batch contract): the logits (or hidden state) at position t predict `labels_BT[:, t]`, and a
sequence log-prob sums `log pi(label_t)` over the positions where `mask_BT` is true (the `loss_mask`).

`chunked_token_logprobs` applies the unembedding and the log-softmax chunk by chunk over T with a
`jax.checkpoint` per chunk inside `lax.map`, so neither the forward nor the backward pass holds a float32
[B, T, V] buffer: peak extra memory is one [B, chunk_size, V] float32 block.

Labels must lie in [0, V). Out-of-range labels cannot be detected at trace time; `token_logprobs` returns NaN
at such positions (concrete numpy labels are checked eagerly), while the sequence functions ignore the label
wherever the mask is false (so HF's -100 at masked positions is harmless).
"""

from __future__ import annotations

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


def chunked_token_logprobs(
    hidden_BTD: jax.Array, unembed_DV: jax.Array, labels_BT: jax.Array, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> jax.Array:
  """log softmax(hidden_BTD @ unembed_DV)[labels_BT] -> [B, T] float32, computed chunk_size positions at a time.

  The matmul accumulates in float32 (`preferred_element_type`), so bf16 hidden/unembedding give the same
  logits as a bf16 model whose LM head returns float32 logits. T need not be divisible by chunk_size (the
  last chunk is zero-padded and the padding dropped). Each chunk is rematerialised in the backward pass.
  """
  _check_chunked_args(hidden_BTD, unembed_DV, labels_BT, chunk_size)
  _check_labels_range(labels_BT, unembed_DV.shape[-1])
  hidden_BTD, unembed_DV, labels_BT = map(jnp.asarray, (hidden_BTD, unembed_DV, labels_BT))
  b, t, d = hidden_BTD.shape
  c = int(min(chunk_size, t)) or 1
  n = -(-t // c)
  pad = n * c - t
  hidden_BTD = jnp.pad(hidden_BTD, ((0, 0), (0, pad), (0, 0)))
  labels_BT = jnp.pad(labels_BT.astype(jnp.int32), ((0, 0), (0, pad)))
  hidden_NBCD = hidden_BTD.reshape(b, n, c, d).transpose(1, 0, 2, 3)
  labels_NBC = labels_BT.reshape(b, n, c).transpose(1, 0, 2)

  @jax.checkpoint
  def one_chunk(args):
    h_BCD, y_BC = args
    logits_BCV = jnp.einsum("bcd,dv->bcv", h_BCD, unembed_DV, preferred_element_type=jnp.float32)
    return _pick_logprobs(logits_BCV, y_BC)

  out_NBC = jax.lax.map(one_chunk, (hidden_NBCD, labels_NBC))
  return out_NBC.transpose(1, 0, 2).reshape(b, n * c)[:, :t]


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
  safe_labels_BT = jnp.where(mask_BT, jnp.asarray(labels_BT), 0)
  return _masked_sum(chunked_token_logprobs(hidden_BTD, unembed_DV, safe_labels_BT, chunk_size=chunk_size), mask_BT)
