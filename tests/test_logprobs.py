"""Tests for displacement_jax.logprobs: float64 numpy references, autodiff, chunked == unchunked, memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from displacement_jax import logprobs


def _np_token_logprobs(logits, labels):
  logits = np.asarray(logits, np.float64)
  lse = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
  return np.take_along_axis(logits, labels[..., None], -1)[..., 0] - lse


def _data(b=2, t=7, d=5, v=11, seed=0):
  rng = np.random.default_rng(seed)
  hidden = rng.normal(size=(b, t, d)).astype(np.float32)
  unembed = rng.normal(size=(d, v)).astype(np.float32)
  labels = rng.integers(0, v, (b, t)).astype(np.int32)
  mask = rng.random((b, t)) > 0.3
  return hidden, unembed, labels, mask


def test_token_logprobs_hand_values():
  # uniform over 4 -> log(1/4); logits [0, ln 3] -> label 1 has prob 3/4
  logits = np.array([[[0.0, 0.0, 0.0, 0.0], [0.0, np.log(3.0), -np.inf, -np.inf]]], np.float32)
  labels = np.array([[2, 1]], np.int32)
  out = logprobs.token_logprobs(logits, labels)
  assert out.dtype == jnp.float32 and out.shape == (1, 2)
  np.testing.assert_allclose(out, [[np.log(0.25), np.log(0.75)]], rtol=1e-6)


def test_token_and_sequence_logprobs_vs_numpy():
  hidden, unembed, labels, mask = _data()
  logits = hidden @ unembed
  np.testing.assert_allclose(
      logprobs.token_logprobs(logits, labels), _np_token_logprobs(logits, labels), rtol=1e-5, atol=1e-5
  )
  expected = [sum(_np_token_logprobs(logits, labels)[b, t] for t in range(7) if mask[b, t]) for b in range(2)]
  np.testing.assert_allclose(logprobs.sequence_logprobs(logits, labels, mask), expected, rtol=1e-5)
  # int 0/1 mask, HF-style -100 labels at masked-out positions are never used
  labels_hf = np.where(mask, labels, -100).astype(np.int32)
  np.testing.assert_allclose(logprobs.sequence_logprobs(logits, labels_hf, mask.astype(np.int32)), expected, rtol=1e-5)
  # bf16 logits: log-softmax in float32 of the bf16 values
  logits_bf16 = jnp.asarray(logits, jnp.bfloat16)
  out = logprobs.sequence_logprobs(logits_bf16, labels, mask)
  assert out.dtype == jnp.float32
  ref = _np_token_logprobs(np.asarray(logits_bf16.astype(jnp.float32)), labels)
  np.testing.assert_allclose(out, (ref * mask).sum(-1), rtol=1e-5)


def test_jit_and_vmap():
  hidden, unembed, labels, mask = _data()
  logits = hidden @ unembed
  ref = logprobs.sequence_logprobs(logits, labels, mask)
  np.testing.assert_allclose(jax.jit(logprobs.sequence_logprobs)(logits, labels, mask), ref, rtol=1e-6)
  per_row = jax.vmap(lambda lg, y, m: logprobs.sequence_logprobs(lg[None], y[None], m[None])[0])
  np.testing.assert_allclose(per_row(logits, labels, mask), ref, rtol=1e-6)
  chunked = jax.jit(lambda h, w, y, m: logprobs.chunked_sequence_logprobs(h, w, y, m, chunk_size=3))
  np.testing.assert_allclose(chunked(hidden, unembed, labels, mask), ref, rtol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64])
def test_chunked_equals_unchunked_values_and_grads(chunk_size):
  hidden, unembed, labels, mask = _data()  # T = 7: 3 does not divide it; 64 > T

  def chunked(h, w):
    return logprobs.chunked_sequence_logprobs(h, w, labels, mask, chunk_size=chunk_size)

  def full(h, w):
    return logprobs.sequence_logprobs(jnp.einsum("btd,dv->btv", h, w), labels, mask)

  np.testing.assert_allclose(
      logprobs.chunked_token_logprobs(hidden, unembed, labels, chunk_size=chunk_size),
      _np_token_logprobs(hidden.astype(np.float64) @ unembed, labels),
      rtol=1e-5,
      atol=1e-5,
  )
  np.testing.assert_allclose(chunked(hidden, unembed), full(hidden, unembed), rtol=1e-5)
  weights = jnp.array([0.7, -1.3])
  g_chunked = jax.grad(lambda h, w: jnp.sum(weights * chunked(h, w)), argnums=(0, 1))(hidden, unembed)
  g_full = jax.grad(lambda h, w: jnp.sum(weights * full(h, w)), argnums=(0, 1))(hidden, unembed)
  for a, b in zip(g_chunked, g_full):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_masked_chunked_head_skips_padding_chunks():
  """With mask_BT, kept positions are compacted to the front and chunks holding none of them are not computed:
  NaN hidden states at the masked positions (whole chunks of them after compaction, and some sharing the last
  live chunk with kept ones) leave every value and both gradients finite and equal to the float64 /
  dense-autodiff reference on the kept positions alone. (The skip runs on a single device; test_train's
  8-device run covers the path that computes every chunk.)"""
  assert jax.device_count() == 1, "the suite runs on one CPU device; the skip is off on several"
  hidden, unembed, labels, _ = _data(b=2, t=8)
  mask = np.zeros((2, 8), bool)
  mask[0, [1, 4, 5]] = mask[1, [0, 2, 3, 6]] = True  # 7 kept of 16: chunks of 2 * 2 = 4 -> 2 live (one masked), 2 dead
  poisoned = np.where(mask[..., None], hidden, np.nan).astype(np.float32)
  labels = np.where(mask, labels, 10_000).astype(np.int32)  # masked labels out of range: never used
  out = logprobs.chunked_token_logprobs(poisoned, unembed, labels, chunk_size=2, mask_BT=mask)
  ref = _np_token_logprobs(hidden.astype(np.float64) @ unembed, np.where(mask, labels, 0))
  np.testing.assert_allclose(out, np.where(mask, ref, 0.0), rtol=1e-5, atol=1e-5)
  weights_BT = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8)), jnp.float32)

  def masked(h, w):
    return jnp.sum(weights_BT * logprobs.chunked_token_logprobs(h, w, labels, chunk_size=2, mask_BT=mask))

  def dense(h, w):
    logp = logprobs.token_logprobs(jnp.einsum("btd,dv->btv", h, w), jnp.where(mask, labels, 0))
    return jnp.sum(jnp.where(mask, weights_BT * logp, 0.0))

  g_masked = jax.grad(masked, argnums=(0, 1))(poisoned, unembed)
  g_dense = jax.grad(dense, argnums=(0, 1))(hidden, unembed)
  np.testing.assert_allclose(g_masked[0], np.where(mask[..., None], g_dense[0], 0.0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(g_masked[1], g_dense[1], rtol=1e-5, atol=1e-6)
  # under jit, and with every position kept (no compaction) the mask changes nothing
  full = np.ones((2, 8), bool)
  in_range = np.where(mask, labels, 3).astype(np.int32)
  np.testing.assert_allclose(
      jax.jit(lambda h: logprobs.chunked_token_logprobs(h, unembed, in_range, chunk_size=2, mask_BT=full))(hidden),
      logprobs.chunked_token_logprobs(hidden, unembed, in_range, chunk_size=2),
      rtol=1e-6,
  )


def test_chunked_bf16_hidden():
  hidden, unembed, labels, mask = _data(t=9)
  h16, w16 = jnp.asarray(hidden, jnp.bfloat16), jnp.asarray(unembed, jnp.bfloat16)
  out = logprobs.chunked_sequence_logprobs(h16, w16, labels, mask, chunk_size=4)
  assert out.dtype == jnp.float32
  full = logprobs.sequence_logprobs(
      jnp.einsum("btd,dv->btv", h16, w16, preferred_element_type=jnp.float32), labels, mask
  )
  np.testing.assert_allclose(out, full, rtol=1e-6)
  # float64 reference on the bf16-rounded values
  ref = _np_token_logprobs(np.asarray(h16, np.float64) @ np.asarray(w16, np.float64), labels)
  np.testing.assert_allclose(out, (ref * mask).sum(-1), rtol=1e-4)
  # bf16 hidden with fp32 unembedding (mixed), and the gradient w.r.t. the bf16 hidden state
  f_chunk = lambda h: jnp.sum(logprobs.chunked_sequence_logprobs(h, unembed, labels, mask, chunk_size=4))
  f_full = lambda h: jnp.sum(logprobs.sequence_logprobs(jnp.einsum("btd,dv->btv", h, unembed), labels, mask))
  np.testing.assert_allclose(f_chunk(h16), f_full(h16), rtol=1e-5)
  g_chunk, g_full = jax.grad(f_chunk)(h16), jax.grad(f_full)(h16)
  assert g_chunk.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(g_chunk, np.float32), np.asarray(g_full, np.float32), rtol=2e-2, atol=1e-2)


def test_chunked_never_holds_full_fp32_logits():
  b, t, d, v = 2, 256, 16, 4096
  full_bytes = b * t * v * 4
  hidden, unembed = jnp.ones((b, t, d)), jnp.ones((d, v))
  labels, mask = jnp.zeros((b, t), jnp.int32), jnp.ones((b, t), bool)

  def temp_bytes(fn):
    grad = jax.jit(jax.grad(fn, argnums=(0, 1)))
    return grad.lower(hidden, unembed).compile().memory_analysis().temp_size_in_bytes

  chunked = temp_bytes(lambda h, w: logprobs.chunked_sequence_logprobs(h, w, labels, mask, chunk_size=32).sum())
  unchunked = temp_bytes(lambda h, w: logprobs.sequence_logprobs(h @ w, labels, mask).sum())
  assert unchunked >= full_bytes  # the measure does see a [B, T, V] fp32 buffer when there is one
  assert chunked < full_bytes / 2


def test_bad_inputs():
  hidden, unembed, labels, mask = _data()
  logits = hidden @ unembed
  with pytest.raises(ValueError, match=r"labels_BT must be an integer array.*float32"):
    logprobs.token_logprobs(logits, labels.astype(np.float32))
  with pytest.raises(ValueError, match=r"logits_BTV must have rank 3.*\(2, 7\)"):
    logprobs.token_logprobs(logits[:, :, 0], labels)
  with pytest.raises(ValueError, match=r"labels_BT must have shape \(2, 7\).*\(2, 6\)"):
    logprobs.sequence_logprobs(logits, labels[:, :6], mask)
  with pytest.raises(ValueError, match=r"mask_BT must have shape"):
    logprobs.sequence_logprobs(logits, labels, mask[:1])
  with pytest.raises(ValueError, match=r"mask_BT must be a bool or integer mask.*float32"):
    logprobs.sequence_logprobs(logits, labels, mask.astype(np.float32))
  with pytest.raises(ValueError, match=r"hidden_BTD must be a floating array.*int32"):
    logprobs.chunked_token_logprobs(hidden.astype(np.int32), unembed, labels)
  with pytest.raises(ValueError, match=r"unembed_DV first dim must equal the hidden size D=5"):
    logprobs.chunked_token_logprobs(hidden, unembed[:4], labels)
  with pytest.raises(ValueError, match=r"chunk_size must be a positive int"):
    logprobs.chunked_token_logprobs(hidden, unembed, labels, chunk_size=0)
  bad = labels.copy()
  bad[0, 0], bad[1, 1] = 11, -3
  with pytest.raises(ValueError, match=r"labels_BT values must lie in \[0, 11\), got min -3 max 11"):
    logprobs.token_logprobs(logits, bad)
  # under jit (no eager check) an out-of-range label gives NaN at that position, not a wrong number
  out = jax.jit(logprobs.token_logprobs)(logits, bad)
  assert np.isnan(out[0, 0]) and np.isnan(out[1, 1]) and np.isfinite(out[0, 1])
  # static checks fire at trace time under jit too
  with pytest.raises(ValueError, match=r"labels_BT must be an integer array"):
    jax.jit(logprobs.chunked_sequence_logprobs)(hidden, unembed, labels.astype(np.float32), mask)
