"""Flax linen decoder-only transformer: Llama-3(.1) / Mistral / Qwen2 / OLMo-1 / Gemma-1 / Gemma-3, with a KV cache.

The param tree mirrors HF names with the decoder layers stacked on a leading axis under `layers/` (one scanned
layer body; models/convert.py maps HF's per-layer names at the io boundary, see DESIGN.md). Norm statistics, RoPE tables, softmax and logits are float32;
everything else runs in `config.dtype` with params stored in `config.param_dtype`.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from displacement_jax.models import lora
from displacement_jax.models.config import ModelConfig

Array = jax.Array
Cache = dict[str, Any]

_log = logging.getLogger(__name__)
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


class TransformerOutput(NamedTuple):
  """Outputs of `Transformer.__call__`; fields not asked for are None."""

  logits_BTV: Array | None = None  # float32
  hidden_BTD: Array | None = None  # after the final norm (the LM-head input)
  all_hidden: tuple[Array, ...] | None = None  # num_layers + 1 arrays, HF convention
  cache: Cache | None = None
  residual_BTD: Array | None = None  # the residual stream after the last layer, before the final norm


def _dtype(name: str) -> jnp.dtype:
  return jnp.dtype(name)


# ----------------------------------------------------------------------------------------------- RoPE


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
  """Inverse frequencies [head_dim // 2] (float32) including llama3 / linear scaling, as HF computes them."""
  hd = config.head_dim
  exponent = np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd)
  inv_freq = (np.float32(1.0) / (np.float32(config.rope_theta) ** exponent)).astype(np.float32)
  rope_type, s = config.rope_type, config.rope_scaling_dict
  if rope_type == "linear":
    inv_freq = inv_freq / np.float32(s["factor"])
  elif rope_type == "llama3":
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_len = float(s["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    inv_freq = np.where(medium, smoothed, scaled)
  return np.asarray(inv_freq, np.float32)


def local_rope_config(config: ModelConfig) -> ModelConfig:
  """The RoPE settings of a Gemma-3 sliding-window layer: base `rope_local_theta`, no scaling."""
  return config.replace(rope_theta=config.rope_local_theta, rope_scaling=None, layer_types=())


def rope_cos_sin(positions_BT: Array, config: ModelConfig) -> tuple[Array, Array]:
  """cos, sin tables [B, T, head_dim] in float32 for integer positions."""
  inv_freq = jnp.asarray(rope_inv_freq(config))
  freqs_BTF = positions_BT.astype(jnp.float32)[..., None] * inv_freq
  emb_BTH = jnp.concatenate([freqs_BTF, freqs_BTF], axis=-1)
  return jnp.cos(emb_BTH), jnp.sin(emb_BTH)


def apply_rope(x_BTNH: Array, cos_BTH: Array, sin_BTH: Array) -> Array:
  """Rotate-half RoPE (HF layout), computed in x's dtype like HF."""
  cos = cos_BTH.astype(x_BTNH.dtype)[:, :, None, :]
  sin = sin_BTH.astype(x_BTNH.dtype)[:, :, None, :]
  half = x_BTNH.shape[-1] // 2
  rotated = jnp.concatenate([-x_BTNH[..., half:], x_BTNH[..., :half]], axis=-1)
  return x_BTNH * cos + rotated * sin


# ---------------------------------------------------------------------------------------------- norms


class RMSNorm(nn.Module):
  """RMSNorm with float32 statistics; `plus_one` applies (1 + w) like Gemma (w initialised at 0)."""

  eps: float
  plus_one: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BTD: Array) -> Array:
    init = nn.initializers.zeros if self.plus_one else nn.initializers.ones
    scale = self.param("scale", init, (x_BTD.shape[-1],), self.param_dtype)
    x32 = x_BTD.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    if self.plus_one:  # Gemma: (x * (1 + w)) in float32, then cast
      return (normed * (1.0 + scale.astype(jnp.float32))).astype(self.dtype)
    return scale.astype(self.dtype) * normed.astype(self.dtype)  # Llama: w * x.to(dtype)


class NonParametricLayerNorm(nn.Module):
  """OLMo-1 LayerNorm: no weight, no bias, float32 statistics."""

  eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BTD: Array) -> Array:
    x32 = x_BTD.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + self.eps)).astype(self.dtype)


def _norm(config: ModelConfig, name: str) -> nn.Module | None:
  dtype, pdtype = _dtype(config.dtype), _dtype(config.param_dtype)
  if config.norm_type == "layernorm_nonparam":
    return NonParametricLayerNorm(eps=config.norm_eps, dtype=dtype, name=None)
  return RMSNorm(
      eps=config.norm_eps, plus_one=config.norm_type == "rms_plus_one", dtype=dtype, param_dtype=pdtype, name=name
  )


class FlatDense(nn.Dense):
  """nn.Dense applied to the input flattened to [N, D] (same params): XLA:CPU runs the backward matmuls of a
  2-D dot much faster than those of a [B, T, D] dot_general (measured ~25% faster train steps on CPU).

  Where the params hold a LoRA adapter beside the kernel (`lora_A`, `lora_B`; models/lora.py) its term is added
  as PEFT adds it, with dropout when a 'dropout' rng is given."""

  lora_config: ModelConfig | None = None

  def __call__(self, inputs: Array) -> Array:
    lead = inputs.shape[:-1]
    x_ND = inputs.reshape(-1, inputs.shape[-1])
    out = super().__call__(x_ND)
    if self.has_variable("params", "lora_A"):
      c = self.lora_config
      rng = self.make_rng("dropout") if c.lora_dropout > 0 and self.has_rng("dropout") else None
      a, b = self.get_variable("params", "lora_A"), self.get_variable("params", "lora_B")
      out = (out + lora.adapter_term(x_ND, a, b, c, rng)).astype(out.dtype)
    return out.reshape(*lead, self.features)


def _dense(config: ModelConfig, features: int, bias: bool, name: str) -> nn.Dense:
  return FlatDense(
      features,
      use_bias=bias,
      dtype=_dtype(config.dtype),
      param_dtype=_dtype(config.param_dtype),
      kernel_init=nn.initializers.normal(0.02),
      lora_config=config,
      name=name,
  )


# ------------------------------------------------------------------------------------------ attention


def _masked_scores(q_BTKGH: Array, k_BSKH: Array, mask_BTS: Array, scale: float) -> Array:
  """Scaled float32 logits [B, K, G, T, S] with masked entries at _MASK_VALUE."""
  logits = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32) * scale
  return jnp.where(mask_BTS[:, None, None], logits, _MASK_VALUE)


def reference_attention(q_BTNH: Array, k_BSKH: Array, v_BSKH: Array, mask_BTS: Array, scale: float) -> Array:
  """Plain-einsum grouped-query attention with float32 logits/softmax (the fallback implementation)."""
  b, t, n, h = q_BTNH.shape
  kv = k_BSKH.shape[2]
  q_BTKGH = q_BTNH.reshape(b, t, kv, n // kv, h)
  logits_BKGTS = _masked_scores(q_BTKGH, k_BSKH, mask_BTS, scale)
  probs = jax.nn.softmax(logits_BKGTS, axis=-1).astype(v_BSKH.dtype)
  out_BTKGH = jnp.einsum("bkgts,bskh->btkgh", probs, v_BSKH)
  return out_BTKGH.reshape(b, t, n, h)


def _attention_fwd_stats(
    q_BTKGH: Array, k_BSKH: Array, v_BSKH: Array, mask_BTS: Array, scale: float
) -> tuple[Array, Array, Array]:
  """(out [B, T, K, G, H], row max [B, K, G, T], row sum of exp [B, K, G, T]). The probabilities are normalised
  before the value product, as `jax.nn.softmax` in `reference_attention` does, so the output rounds the same
  (normalising after it moved real-checkpoint logits by 1e-5 in fp32)."""
  s_BKGTS = _masked_scores(q_BTKGH, k_BSKH, mask_BTS, scale)
  m_BKGT = jnp.max(s_BKGTS, axis=-1)
  e_BKGTS = jnp.exp(s_BKGTS - m_BKGT[..., None])
  l_BKGT = jnp.sum(e_BKGTS, axis=-1)
  p_BKGTS = (e_BKGTS / l_BKGT[..., None]).astype(v_BSKH.dtype)
  out = jnp.einsum("bkgts,bskh->btkgh", p_BKGTS, v_BSKH)
  return out, m_BKGT, l_BKGT


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def recompute_attention(q_BTKGH: Array, k_BSKH: Array, v_BSKH: Array, mask_BTS: Array, scale: float) -> Array:
  """`reference_attention` (grouped layout, float32 softmax) whose backward recomputes the probabilities from
  the saved row max and sum (flash-attention style): no float [T, S] block is kept for the backward pass (only
  the boolean mask), and the softmax's backward uses rowsum(dout * out) instead of a pass over [T, S]."""
  return _attention_fwd_stats(q_BTKGH, k_BSKH, v_BSKH, mask_BTS, scale)[0]


def _recompute_fwd(
    q_BTKGH: Array, k_BSKH: Array, v_BSKH: Array, mask_BTS: Array, scale: float
) -> tuple[Array, tuple[Array, ...]]:
  """The custom VJP's forward: (out, residuals: the inputs, out and the row statistics)."""
  out, m_BKGT, l_BKGT = _attention_fwd_stats(q_BTKGH, k_BSKH, v_BSKH, mask_BTS, scale)
  return out, (q_BTKGH, k_BSKH, v_BSKH, mask_BTS, out, m_BKGT, l_BKGT)


def _recompute_bwd(scale: float, res: tuple[Array, ...], dout_BTKGH: Array) -> tuple[Array | None, ...]:
  """Cotangents of q, k, v (none for the mask) from the probabilities recomputed from the saved row max and sum."""
  q_BTKGH, k_BSKH, v_BSKH, mask_BTS, out, m_BKGT, l_BKGT = res
  p_BKGTS = jnp.exp(_masked_scores(q_BTKGH, k_BSKH, mask_BTS, scale) - m_BKGT[..., None]) / l_BKGT[..., None]
  dv = jnp.einsum("bkgts,btkgh->bskh", p_BKGTS.astype(dout_BTKGH.dtype), dout_BTKGH, preferred_element_type=jnp.float32)
  dp_BKGTS = jnp.einsum("btkgh,bskh->bkgts", dout_BTKGH, v_BSKH, preferred_element_type=jnp.float32)
  delta_BKGT = jnp.einsum("btkgh,btkgh->bkgt", dout_BTKGH, out, preferred_element_type=jnp.float32)
  # where(): masked logits are constants (no gradient), also in fully masked rows where p is 1/S
  ds_BKGTS = jnp.where(mask_BTS[:, None, None], p_BKGTS * (dp_BKGTS - delta_BKGT[..., None]), 0.0) * scale
  ds_BKGTS = ds_BKGTS.astype(q_BTKGH.dtype)
  dq = jnp.einsum("bkgts,bskh->btkgh", ds_BKGTS, k_BSKH, preferred_element_type=jnp.float32)
  dk = jnp.einsum("bkgts,btkgh->bskh", ds_BKGTS, q_BTKGH, preferred_element_type=jnp.float32)
  return dq.astype(q_BTKGH.dtype), dk.astype(k_BSKH.dtype), dv.astype(v_BSKH.dtype), None


recompute_attention.defvjp(_recompute_fwd, _recompute_bwd)


QUERY_BLOCK = 128  # queries per block of `causal_block_attention` (at least; see `query_block`)
MAX_QUERY_BLOCKS = 8  # longer sequences get larger blocks: compile time grows with the number of blocks


def query_block(t: int, block: int = QUERY_BLOCK, max_blocks: int = MAX_QUERY_BLOCKS) -> int:
  """Queries per block for a length-`t` sequence: `block`, or ceil(t / max_blocks) rounded up to a multiple of 8
  where that is larger (at most `max_blocks` blocks, each unrolled in the compiled program)."""
  per_block = -(-t // max_blocks)  # ceil(t / max_blocks)
  return max(block, -(-per_block // 8) * 8)


def causal_block_attention(
    q_BTNH: Array, k_BTKH: Array, v_BTKH: Array, mask_BTS: Array, scale: float, block: int | None = None
) -> Array:
  """`reference_attention` of a CAUSAL mask (no query sees a later slot: every mask of a forward without a KV
  cache), one block of queries at a time (`query_block(T)` unless `block` is given) against the keys up to the
  block's end: the same result for about half the scores, in blocks small enough to stay in cache
  (benchmarks/attention.py, BENCHMARKS.md: on the 2-core CPU at [4, 512] forward + backward 114 ms in 128-query
  blocks against 234 ms for the full square; 128-query blocks compile in half the time of 64-query ones)."""
  b, t, n, h = q_BTNH.shape
  kv = k_BTKH.shape[2]
  q_BTKGH = q_BTNH.reshape(b, t, kv, n // kv, h)
  block = query_block(t) if block is None else block
  outs = []
  for start in range(0, t, block):
    end = min(start + block, t)
    outs.append(
        recompute_attention(
            q_BTKGH[:, start:end], k_BTKH[:, :end], v_BTKH[:, :end], mask_BTS[:, start:end, :end], scale
        )
    )
  return jnp.concatenate(outs, axis=1).reshape(b, t, n, h)


def attention(q_BTNH: Array, k_BSKH: Array, v_BSKH: Array, mask_BTS: Array, scale: float, impl: str | None) -> Array:
  """Attention by `impl`: 'reference' (`reference_attention`), 'blocked' (`causal_block_attention`; the mask must
  be causal), else jax.nn.dot_product_attention (implementation 'xla' | 'cudnn', None lets JAX choose), falling
  back to `reference_attention` where that implementation refuses the shape or dtype."""
  if impl == "reference":
    return reference_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale)
  if impl == "blocked":
    return causal_block_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale)
  try:
    return jax.nn.dot_product_attention(
        q_BTNH, k_BSKH, v_BSKH, mask=mask_BTS[:, None], scale=scale, implementation=impl
    )
  except (ValueError, NotImplementedError, RuntimeError, TypeError) as e:  # e.g. cuDNN unsupported shape/dtype
    _log.warning("jax.nn.dot_product_attention(implementation=%r) failed (%s); using reference attention", impl, e)
    return reference_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale)


class Attention(nn.Module):
  """Multi-head / grouped-query / multi-query attention with RoPE, optional qkv clipping and a KV cache."""

  config: ModelConfig

  @nn.compact
  def __call__(
      self,
      x_BTD: Array,
      cos_BTH: Array,
      sin_BTH: Array,
      mask_BTS: Array,
      kv_cache: dict[str, Array] | None,
      index: Array | None,
  ):
    c = self.config
    b, t, _ = x_BTD.shape
    q = _dense(c, c.num_heads * c.head_dim, c.qkv_bias, "q_proj")(x_BTD)
    k = _dense(c, c.num_kv_heads * c.head_dim, c.qkv_bias, "k_proj")(x_BTD)
    v = _dense(c, c.num_kv_heads * c.head_dim, c.qkv_bias, "v_proj")(x_BTD)
    if c.clip_qkv is not None:
      q, k, v = (jnp.clip(a, -c.clip_qkv, c.clip_qkv) for a in (q, k, v))
    q_BTNH, k_BTKH = q.reshape(b, t, c.num_heads, c.head_dim), k.reshape(b, t, c.num_kv_heads, c.head_dim)
    if c.qk_norm:  # Gemma-3: RMSNorm (1 + w) over each head's features, before RoPE
      q_BTNH, k_BTKH = _norm(c, "q_norm")(q_BTNH), _norm(c, "k_norm")(k_BTKH)
    q_BTNH = apply_rope(q_BTNH, cos_BTH, sin_BTH)
    k_BTKH = apply_rope(k_BTKH, cos_BTH, sin_BTH)
    v_BTKH = v.reshape(b, t, c.num_kv_heads, c.head_dim)
    new_cache = None
    if kv_cache is not None:
      k_BSKH = jax.lax.dynamic_update_slice(kv_cache["k"], k_BTKH.astype(kv_cache["k"].dtype), (0, index, 0, 0))
      v_BSKH = jax.lax.dynamic_update_slice(kv_cache["v"], v_BTKH.astype(kv_cache["v"].dtype), (0, index, 0, 0))
      new_cache = {"k": k_BSKH, "v": v_BSKH}
      k_BSKH, v_BSKH = k_BSKH.astype(q_BTNH.dtype), v_BSKH.astype(q_BTNH.dtype)
    else:
      k_BSKH, v_BSKH = k_BTKH, v_BTKH
    impl = c.attention_impl
    if impl is None:  # default: causal blocks without a KV cache (every such mask is causal), JAX's choice with one
      impl = "blocked" if kv_cache is None else None
    scale = (c.query_pre_attn_scalar or c.head_dim) ** -0.5
    out_BTNH = attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale, impl)
    out = _dense(c, c.hidden_size, c.o_bias, "o_proj")(out_BTNH.reshape(b, t, c.num_heads * c.head_dim))
    return out, new_cache


_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


class MLP(nn.Module):
  """Gated MLP: down(act(gate(x)) * up(x))."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x_BTD: Array) -> Array:
    c = self.config
    gate = _dense(c, c.intermediate_size, c.mlp_bias, "gate_proj")(x_BTD)
    up = _dense(c, c.intermediate_size, c.mlp_bias, "up_proj")(x_BTD)
    return _dense(c, c.hidden_size, c.mlp_bias, "down_proj")(_ACTIVATIONS[c.hidden_act](gate) * up)


class DecoderLayer(nn.Module):
  """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.)); with `sandwich_norm` (Gemma-3)
  x + norm(attn(norm(x))), then + norm(mlp(norm(.))).

  Called through `nn.scan` over the layers (params stacked on a leading layer axis): returns the new residual
  stream (the scan carry) and (this layer's new KV cache, its output when `collect_hidden`) as the scan output.
  With `layer_types`, the RoPE tables and the mask come as (full-attention, sliding-window) pairs and `local`
  (this layer's entry of `config.local_layers`, scanned) picks one.
  """

  config: ModelConfig
  collect_hidden: bool = False

  @nn.compact
  def __call__(
      self,
      x_BTD: Array,
      cos_BTH: Array,
      sin_BTH: Array,
      mask_BTS: Array,
      kv_cache: dict[str, Array] | None,
      index: Array | None,
      local: Array | None = None,
  ):
    c = self.config
    if local is not None:
      cos_BTH, sin_BTH, mask_BTS = (jnp.where(local, pair[1], pair[0]) for pair in (cos_BTH, sin_BTH, mask_BTS))
    h = _norm(c, "input_layernorm")(x_BTD)
    attn, new_cache = Attention(c, name="self_attn")(h, cos_BTH, sin_BTH, mask_BTS, kv_cache, index)
    if c.sandwich_norm:
      x_BTD = x_BTD + _norm(c, "post_attention_layernorm")(attn)
      mlp = MLP(c, name="mlp")(_norm(c, "pre_feedforward_layernorm")(x_BTD))
      x_BTD = x_BTD + _norm(c, "post_feedforward_layernorm")(mlp)
    else:
      x_BTD = x_BTD + attn
      x_BTD = x_BTD + MLP(c, name="mlp")(_norm(c, "post_attention_layernorm")(x_BTD))
    return x_BTD, (new_cache, x_BTD if self.collect_hidden else None)


# -------------------------------------------------------------------------------------------- masks


def positions_from_mask(mask_BT: Array, offset_B: Array | None = None) -> Array:
  """cumsum(mask) - 1 clipped at 0 (plus per-row offset): positions for any padding side."""
  pos = jnp.maximum(jnp.cumsum(mask_BT.astype(jnp.int32), axis=1) - 1, 0)
  if offset_B is not None:
    pos = pos + offset_B[:, None]
  return pos


def attention_mask_BTS(key_valid_BS: Array, query_slot_T: Array, sliding_window: int | None) -> Array:
  """Causal AND key-padding (AND sliding window) mask; every query may also attend its own slot (no NaN rows)."""
  key_slot_S = jnp.arange(key_valid_BS.shape[1])
  causal_TS = key_slot_S[None, :] <= query_slot_T[:, None]
  if sliding_window is not None:
    causal_TS &= (query_slot_T[:, None] - key_slot_S[None, :]) < sliding_window
  diagonal_TS = key_slot_S[None, :] == query_slot_T[:, None]
  return (causal_TS[None] & key_valid_BS[:, None, :]) | diagonal_TS[None]


def branch_attention_mask_BTS(
    valid_BT: Array,
    branch_BT: Array,
    positions_BT: Array,
    sliding_window: int | None,
    segment_BT: Array | None = None,
) -> Array:
  """Shared-prefix (tree) mask of a packed row: slot j is visible from slot i iff j <= i, j is a valid slot,
  j lies in i's segment (the pair it belongs to, when a row holds several; `segment_BT`), and j lies on the
  shared prefix (branch 0) or on i's own branch. The sliding window counts positions (the distance within i's
  own unpacked sequence), not slots. Every query also sees its own slot.
  """
  t = valid_BT.shape[1]
  slot_T = jnp.arange(t)
  causal_TS = slot_T[None, :] <= slot_T[:, None]
  same_BTS = (branch_BT[:, None, :] == 0) | (branch_BT[:, None, :] == branch_BT[:, :, None])
  if segment_BT is not None:
    same_BTS &= segment_BT[:, None, :] == segment_BT[:, :, None]
  mask_BTS = causal_TS[None] & same_BTS & valid_BT[:, None, :]
  if sliding_window is not None:
    mask_BTS &= (positions_BT[:, :, None] - positions_BT[:, None, :]) < sliding_window
  return mask_BTS | (slot_T[None, :] == slot_T[:, None])[None]


# ---------------------------------------------------------------------------------------------- cache


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype: Any = None) -> Cache:
  """An empty KV cache for `batch` rows and `max_len` slots (keys/values in `dtype`, default config.dtype).

  Structure: {'index': int32 next slot, 'length_B': int32 real tokens seen, 'mask_BS': bool valid slots,
  'layers': {'k', 'v'} [num_layers, B, max_len, num_kv_heads, head_dim]} (stacked like the layer params).
  """
  if batch <= 0 or max_len <= 0:
    raise ValueError(f"init_cache needs batch > 0 and max_len > 0, got batch={batch}, max_len={max_len}")
  dtype = _dtype(dtype or config.dtype)
  shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
  return {
      "index": jnp.zeros((), jnp.int32),
      "length_B": jnp.zeros((batch,), jnp.int32),
      "mask_BS": jnp.zeros((batch, max_len), bool),
      "layers": {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)},
  }


# ---------------------------------------------------------------------------------------------- model


def _check_inputs(
    input_ids_BT: Any, attention_mask_BT: Any, positions_BT: Any, cache: Cache | None, config: ModelConfig
) -> None:
  ids_shape, mask_shape = tuple(np.shape(input_ids_BT)), tuple(np.shape(attention_mask_BT))
  if len(ids_shape) != 2:
    raise ValueError(f"input_ids_BT must have shape [batch, seq], got shape {ids_shape}")
  if not jnp.issubdtype(jnp.asarray(input_ids_BT).dtype, jnp.integer):
    raise ValueError(f"input_ids_BT must be an integer array, got dtype {jnp.asarray(input_ids_BT).dtype}")
  if mask_shape != ids_shape:
    raise ValueError(f"attention_mask_BT shape {mask_shape} must equal input_ids_BT shape {ids_shape}")
  if positions_BT is not None and tuple(np.shape(positions_BT)) != ids_shape:
    raise ValueError(f"positions_BT shape {tuple(np.shape(positions_BT))} must equal input_ids_BT shape {ids_shape}")
  if cache is not None:
    cache_shape = tuple(np.shape(cache["mask_BS"]))
    if cache["layers"]["k"].shape[0] != config.num_layers:
      raise ValueError(f"cache has {cache['layers']['k'].shape[0]} layers, model has {config.num_layers}")
    if cache_shape[0] != ids_shape[0] or cache_shape[1] < ids_shape[1]:
      raise ValueError(f"cache mask_BS shape {cache_shape} does not fit input_ids_BT shape {ids_shape}")
  ids = input_ids_BT
  if not isinstance(ids, jax.core.Tracer):
    arr = np.asarray(ids)
    if arr.size and (arr.min() < 0 or arr.max() >= config.vocab_size):
      raise ValueError(f"input_ids_BT values must lie in [0, {config.vocab_size}), got min {arr.min()} max {arr.max()}")


class Transformer(nn.Module):
  """Decoder-only LM. See `TransformerOutput` and DESIGN.md for the contract."""

  config: ModelConfig

  @nn.compact
  def __call__(
      self,
      input_ids_BT: Array,
      attention_mask_BT: Array,
      *,
      positions_BT: Array | None = None,
      branch_BT: Array | None = None,
      segment_BT: Array | None = None,
      cache: Cache | None = None,
      return_logits: bool = True,
      return_hidden: bool = False,
      return_all_hidden: bool = False,
      residual_BTD: Array | None = None,
      return_residual: bool = False,
  ) -> TransformerOutput:
    """`residual_BTD`: the residual stream entering the first layer, used instead of the (scaled) embedding of
    `input_ids_BT` (which still give the shapes; audit/truncated.py feeds a model of the last layers this way).
    `return_residual`: also return the stream after the last layer, before the final norm."""
    c = self.config
    _check_inputs(input_ids_BT, attention_mask_BT, positions_BT, cache, c)
    if branch_BT is not None and (cache is not None or positions_BT is None):
      raise ValueError("branch_BT (shared-prompt packing, data/packing.py) needs explicit positions_BT and no cache")
    for name, arr in (("branch_BT", branch_BT), ("segment_BT", segment_BT)):
      if arr is not None and tuple(np.shape(arr)) != tuple(np.shape(input_ids_BT)):
        raise ValueError(
            f"{name} shape {tuple(np.shape(arr))} must equal input_ids_BT shape {tuple(np.shape(input_ids_BT))}"
        )
    if segment_BT is not None and branch_BT is None:
      raise ValueError("segment_BT (several pairs per packed row) needs branch_BT")
    dtype = _dtype(c.dtype)
    mask_BT = jnp.asarray(attention_mask_BT).astype(bool)
    t = input_ids_BT.shape[1]

    embed = nn.Embed(
        c.vocab_size,
        c.hidden_size,
        dtype=dtype,
        param_dtype=_dtype(c.param_dtype),
        embedding_init=nn.initializers.normal(0.02),
        name="embed_tokens",
    )
    if residual_BTD is not None:
      if tuple(residual_BTD.shape) != (*np.shape(input_ids_BT), c.hidden_size):
        raise ValueError(f"residual_BTD shape {tuple(residual_BTD.shape)} must be input_ids_BT's + ({c.hidden_size},)")
      x_BTD = residual_BTD.astype(dtype)
    else:
      x_BTD = embedded_input(embed(input_ids_BT), input_ids_BT, c)

    if cache is None:
      index = None
      key_valid_BS = mask_BT
      query_slot_T = jnp.arange(t)
      offset_B = None
    else:
      index = cache["index"]
      key_valid_BS = jax.lax.dynamic_update_slice(cache["mask_BS"], mask_BT, (0, index))
      query_slot_T = index + jnp.arange(t)
      offset_B = cache["length_B"]
    if positions_BT is None:
      positions_BT = positions_from_mask(mask_BT, offset_B)
    segment = None if segment_BT is None else jnp.asarray(segment_BT)

    def mask_for(window: int | None) -> Array:
      if branch_BT is None:
        return attention_mask_BTS(key_valid_BS, query_slot_T, window)
      return branch_attention_mask_BTS(mask_BT, jnp.asarray(branch_BT), positions_BT, window, segment)

    cos_BTH, sin_BTH = rope_cos_sin(positions_BT, c)
    local_L = None
    if c.layer_types:  # Gemma-3: (full-attention, sliding-window) pairs, picked per layer by local_L
      local_cos_BTH, local_sin_BTH = rope_cos_sin(positions_BT, local_rope_config(c))
      cos_BTH, sin_BTH = (cos_BTH, local_cos_BTH), (sin_BTH, local_sin_BTH)
      mask_BTS = (mask_for(None), mask_for(c.sliding_window))
      local_L = jnp.asarray(c.local_layers)
    else:
      mask_BTS = mask_for(c.sliding_window)

    # One compiled layer body scanned over the stacked layer params (compile time independent of depth);
    # remat per layer keeps only each layer's input for the backward pass.
    layer_cls = nn.remat(DecoderLayer, prevent_cse=False) if c.remat else DecoderLayer

    layers = nn.scan(
        layer_cls,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast, 0),
        length=c.num_layers,
    )(c, collect_hidden=return_all_hidden, name="layers")

    embedded_BTD = x_BTD
    x_BTD, (new_kv, per_layer_LBTD) = layers(
        x_BTD, cos_BTH, sin_BTH, mask_BTS, cache["layers"] if cache is not None else None, index, local_L
    )

    hidden_BTD = _norm(c, "norm")(x_BTD)
    all_hidden = None
    if return_all_hidden:  # HF convention: embeddings, each layer's output, the last one after the final norm
      all_hidden = (embedded_BTD, *(per_layer_LBTD[i] for i in range(c.num_layers - 1)), hidden_BTD)

    new_cache = None
    if cache is not None:
      new_cache = {
          "index": index + t,
          "length_B": cache["length_B"] + mask_BT.sum(axis=1, dtype=jnp.int32),
          "mask_BS": key_valid_BS,
          "layers": new_kv,
      }

    lm_kernel_DV = None if c.tie_word_embeddings else _LMHead(c, name="lm_head")()
    logits_BTV = None
    if return_logits:
      unembed_DV = embed.embedding.T if c.tie_word_embeddings else lm_kernel_DV
      logits_BTV = jnp.einsum("btd,dv->btv", hidden_BTD, unembed_DV.astype(dtype), preferred_element_type=jnp.float32)
    return TransformerOutput(
        logits_BTV=logits_BTV,
        hidden_BTD=hidden_BTD if return_hidden else None,
        all_hidden=all_hidden,
        cache=new_cache,
        residual_BTD=x_BTD if return_residual else None,
    )


def embedded_input(lookup_BTD: Array, input_ids_BT: Array, c: ModelConfig) -> Array:
  """The residual stream entering the first layer from the looked-up embedding rows `lookup_BTD` of `input_ids_BT`:
  in the compute dtype, pad rows without a lookup gradient (HF's padding_idx, when frozen) and Gemma's sqrt(d)
  scale (audit/factored.py differentiates through it from the rows)."""
  dtype = _dtype(c.dtype)
  x_BTD = lookup_BTD.astype(dtype)
  if c.freeze_pad_embedding and c.pad_token_id is not None:  # HF's padding_idx: no lookup gradient for pad
    x_BTD = jnp.where((input_ids_BT == c.pad_token_id)[..., None], jax.lax.stop_gradient(x_BTD), x_BTD)
  if c.embed_scale:  # Gemma: sqrt(d) rounded to the compute dtype; Gemma-3: to the embedding's dtype (as HF)
    scale_dtype = _dtype(c.param_dtype) if c.model_type == "gemma3_text" else dtype
    x_BTD = x_BTD * jnp.asarray(c.hidden_size**0.5, scale_dtype).astype(dtype)
  return x_BTD


class _LMHead(nn.Module):
  """Holds the untied LM-head kernel [D, V] under 'lm_head/kernel'."""

  config: ModelConfig

  @nn.compact
  def __call__(self) -> Array:
    c = self.config
    return self.param("kernel", nn.initializers.normal(0.02), (c.hidden_size, c.vocab_size), _dtype(c.param_dtype))


def unembedding(params: dict[str, Any], config: ModelConfig) -> Array:
  """The LM-head matrix [D, V] (the embedding transposed when tied), for chunked log-probs."""
  p = params.get("params", params)
  if config.tie_word_embeddings:
    return jnp.asarray(p["embed_tokens"]["embedding"]).T
  return jnp.asarray(p["lm_head"]["kernel"])


def init_params(config: ModelConfig, rng: Array, *, seq_len: int = 2) -> dict[str, Any]:
  """Randomly initialised params (the bare tree, without the 'params' collection wrapper)."""
  ids = jnp.zeros((1, seq_len), jnp.int32)
  variables = Transformer(config).init(rng, ids, jnp.ones((1, seq_len), bool))
  return variables["params"]
