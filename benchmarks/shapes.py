"""Model shapes the benchmarks run at, as Hugging Face config kwargs (random weights; nothing is downloaded).

`tiny` exists so the benchmark scripts themselves can be tested on a CPU in seconds; `cpu` is the shape of the
CPU-vs-PyTorch comparison; `olmo-1b` and `llama3-8b` are the real architectures' shapes (from their
config.json files on the hub) for the GPU figures.
"""

from __future__ import annotations

from typing import Any

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        model_type="llama",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    ),
    "cpu": dict(
        model_type="llama",
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    ),
    # HuggingFaceTB/SmolLM2-135M-Instruct (the packaged real model): 30 layers, GQA 9/3, tied, rope theta 1e5.
    "smollm2-135m": dict(
        model_type="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
        rope_theta=100000.0,
    ),
    # allenai/OLMo-1B-hf: non-parametric LayerNorm, tied embeddings, MHA.
    "olmo-1b": dict(
        model_type="olmo",
        vocab_size=50304,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=16,
        tie_word_embeddings=True,
    ),
    # meta-llama/Meta-Llama-3-8B: GQA 32/8, rope theta 5e5, untied.
    "llama3-8b": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
        rope_theta=500000.0,
    ),
}


def hf_config(shape: str, **overrides: Any):
  """A transformers PretrainedConfig of the named shape (for the PyTorch baselines)."""
  import transformers  # pylint: disable=g-import-not-at-top

  if shape not in SHAPES:
    raise ValueError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")
  kw = dict(SHAPES[shape], **overrides)
  model_type = kw.pop("model_type")
  rope_theta = kw.pop("rope_theta", 10000.0)
  cls = {"llama": transformers.LlamaConfig, "olmo": transformers.OlmoConfig}[model_type]
  return cls(
      **kw,
      max_position_embeddings=4096,
      rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
      pad_token_id=0,
      bos_token_id=1,
      eos_token_id=2,
  )


def model_config(
    shape: str,
    *,
    dtype: str = "float32",
    param_dtype: str | None = None,
    remat: bool = False,
    attention_impl: str | None = None,
):
  """Our ModelConfig of the named shape (attention_impl: None lets JAX choose, or 'xla' / 'cudnn')."""
  from displacement_jax.models.config import ModelConfig  # pylint: disable=g-import-not-at-top

  return ModelConfig.from_hf(
      hf_config(shape).to_dict(),
      dtype=dtype,
      param_dtype=param_dtype or dtype,
      remat=remat,
      attention_impl=attention_impl,
  )


def flops_shape(shape: str) -> dict[str, int]:
  """Keyword arguments of benchmarks.flops.forward_flops_per_token for the named shape (without seq_len)."""
  s = SHAPES[shape]
  return dict(
      hidden_size=s["hidden_size"],
      intermediate_size=s["intermediate_size"],
      num_layers=s["num_hidden_layers"],
      num_heads=s["num_attention_heads"],
      num_kv_heads=s["num_key_value_heads"],
      head_dim=s["hidden_size"] // s["num_attention_heads"],
      vocab_size=s["vocab_size"],
  )
