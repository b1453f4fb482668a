"""Model FLOPs of a decoder-only transformer, for model-FLOPs utilisation (MFU).

Counts the matrix multiplies of one forward pass per token (2 FLOPs per multiply-add): the attention
projections, the attention scores and weighted values over the full (non-causal-discounted) context, the gated
MLP and the LM head. A training step is three forward passes' worth (forward + backward); rematerialisation is
hardware work, not model work, and is not counted (the PaLM convention).
"""

from __future__ import annotations

# bf16 dense peak (TFLOP/s) of the accelerators the device tool may lend, from the vendors' datasheets
# (dense, no sparsity). MFU = model FLOPs per second / this.
BF16_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "v5e": 197.0, "v5p": 459.0, "v4": 275.0}


def forward_flops_per_token(
    *,
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    vocab_size: int,
    seq_len: int,
    lm_head: bool = True,
) -> float:
  """FLOPs of one forward pass, per token, at context length `seq_len`."""
  d, f, q, kv = hidden_size, intermediate_size, num_heads * head_dim, num_kv_heads * head_dim
  projections = 2 * d * q + 2 * 2 * d * kv + 2 * q * d
  attention = 2 * 2 * seq_len * q  # q.k^T and p.v over the whole context
  mlp = 3 * 2 * d * f
  head = 2 * d * vocab_size if lm_head else 0
  return num_layers * (projections + attention + mlp) + head


def train_flops_per_token(**shape) -> float:
  """Model FLOPs of one training step per token: forward plus backward (twice the forward)."""
  return 3.0 * forward_flops_per_token(**shape)


def mfu(model_flops: float, seconds: float, peak_tflops: float) -> float:
  """Model FLOPs utilisation in [0, 1]."""
  return model_flops / seconds / (peak_tflops * 1e12)


def step_flops(
    *,
    slots: int,
    head_positions: int,
    attention_pairs: int,
    head_recomputed: bool = False,
    scores_recomputed: bool = False,
    **shape: int,
) -> float:
  """Hardware FLOPs of one training step as laid out: `slots` token slots through the layers (padding included),
  `attention_pairs` (query, key) pairs scored per head and layer, the LM head on `head_positions` positions
  (plus one more forward of it when its backward recomputes the logits, and one more QK^T product when the
  attention's backward recomputes its probabilities). `shape`: `forward_flops_per_token`'s model sizes.
  Forward + backward = 3 forwards."""
  per_slot = forward_flops_per_token(**shape, seq_len=0, lm_head=False)  # projections and MLP of every layer
  attention = shape["num_layers"] * 2 * 2 * shape["head_dim"] * shape["num_heads"] * attention_pairs
  head = 2 * shape["hidden_size"] * shape["vocab_size"] * head_positions
  recomputed = (head if head_recomputed else 0.0) + (attention / 2 if scores_recomputed else 0.0)
  return 3.0 * (slots * per_slot + attention + head) + recomputed
