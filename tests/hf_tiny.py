"""Tiny random Hugging Face (PyTorch) reference models for offline tests.

`build_tiny_hf_model(family, out_dir)` builds a 2-layer, d=64 model of one supported family with
transformers + torch, perturbs its norm weights and biases (so conventions such as Gemma's `1 + w`
are actually exercised), and `save_pretrained`s it (safetensors) into `out_dir`.

Families: llama (Llama-3 style: GQA, rope theta 5e5, untied), llama31 (Llama-3.1 "llama3" RoPE scaling
with a small original_max_position_embeddings so scaling matters), mistral (v0.2: no sliding window),
qwen2 (qkv bias), olmo (OLMo-1: non-parametric LayerNorm, tied), olmo_clip (OLMo-1 with clip_qkv),
gemma (Gemma-1: (1+w) RMSNorm, sqrt(d) embedding scale, GeGLU tanh, head_dim != d/h, MQA, tied),
gemma3 (Gemma-3: gemma's plus q/k norms, sandwich norms, a sliding-window layer (window 4) with its own RoPE
base then a full-attention one, query_pre_attn_scalar != head_dim).
"""

from __future__ import annotations

import os
from typing import Any

FAMILIES = ("llama", "llama31", "mistral", "qwen2", "olmo", "olmo_clip", "gemma", "gemma3")

# Special token ids shared by every tiny model (match displacement_jax.models.tiny where possible).
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


def tiny_hf_config_kwargs(family: str, *, vocab_size: int = 300, **over: Any) -> tuple[str, dict[str, Any]]:
  """(config class name, kwargs) of the tiny config of `family`; `over` overrides any kwarg."""
  common: dict[str, Any] = dict(
      vocab_size=vocab_size,
      hidden_size=64,
      intermediate_size=128,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      max_position_embeddings=128,
      initializer_range=0.1,
      pad_token_id=PAD_ID,
      bos_token_id=BOS_ID,
      eos_token_id=EOS_ID,
      tie_word_embeddings=False,
  )
  if family == "llama":
    cls = "LlamaConfig"
    kw = dict(common, rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
  elif family == "llama31":
    cls = "LlamaConfig"
    kw = dict(
        common,
        rms_norm_eps=1e-5,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    )
  elif family == "mistral":
    cls = "MistralConfig"
    kw = dict(
        common, rms_norm_eps=1e-5, sliding_window=None, rope_parameters={"rope_type": "default", "rope_theta": 1e6}
    )
  elif family == "qwen2":
    cls = "Qwen2Config"
    kw = dict(common, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
  elif family in ("olmo", "olmo_clip"):
    cls = "OlmoConfig"
    kw = dict(common, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if family == "olmo_clip":
      kw["clip_qkv"] = 0.3
  elif family == "gemma":
    cls = "GemmaConfig"
    kw = dict(
        common,
        num_key_value_heads=1,
        head_dim=32,
        hidden_act="gelu_pytorch_tanh",
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
  elif family == "gemma3":
    cls = "Gemma3TextConfig"
    kw = dict(
        common,
        num_key_value_heads=1,
        head_dim=32,
        hidden_activation="gelu_pytorch_tanh",
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        query_pre_attn_scalar=24,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
    )
  else:
    raise ValueError(f"unknown tiny family {family!r}; expected one of {FAMILIES}")
  kw.update(over)
  return cls, kw


def build_tiny_hf_torch_model(family: str, *, vocab_size: int = 300, seed: int = 0, **over: Any):
  """A tiny random `*ForCausalLM` (torch, fp32, eval mode) of `family`, with perturbed norms/biases."""
  import torch
  import transformers

  cls_name, kw = tiny_hf_config_kwargs(family, vocab_size=vocab_size, **over)
  config = getattr(transformers, cls_name)(**kw)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for _, p in model.named_parameters():
      if p.ndim == 1:  # norm weights and biases: make them non-trivial
        p.add_(0.2 * torch.randn(p.shape, generator=gen))
  model.eval()
  return model


def build_tiny_hf_model(
    family: str, out_dir: str | os.PathLike, *, vocab_size: int = 300, seed: int = 0, **over: Any
) -> str:
  """Build a tiny random HF model of `family` and `save_pretrained` it (safetensors) into `out_dir`.

  Returns `out_dir` as a string. `over` overrides config kwargs (e.g. num_hidden_layers=1).
  """
  model = build_tiny_hf_torch_model(family, vocab_size=vocab_size, seed=seed, **over)
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  model.save_pretrained(out_dir, safe_serialization=True)
  return out_dir
