"""Tiny synthetic GGUF files written the way llama.cpp's converter writes them (for tests/test_gguf.py).

`write_tiny_llama_gguf(path, types)` takes the tiny random HF llama of tests/hf_tiny.py (vocab 256), permutes
the rows of every Q and K weight as llama.cpp's convert_hf_to_gguf.py does (the rotary halves of each head
interleaved: reshape(heads, 2, head_dim // 2, in) -> swap axes 1, 2), quantizes each 2-D weight with the next
type of `types` (gguf.quants, llama.cpp's reference code) and writes a GGUF file with the llama.* metadata.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from tests import hf_tiny

GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def llama_cpp_permute(weight_OI: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp's Q/K row permutation (convert_hf_to_gguf.py LlamaModel.permute)."""
  return (
      weight_OI.reshape(heads, 2, weight_OI.shape[0] // heads // 2, *weight_OI.shape[1:])
      .swapaxes(1, 2)
      .reshape(weight_OI.shape)
  )


def gguf_name(hf_name: str) -> str:
  if hf_name in GGUF_NAMES:
    return GGUF_NAMES[hf_name]
  _, _, layer, rest = hf_name.split(".", 3)
  return f"blk.{layer}.{LAYER_NAMES[rest]}"


def write_tiny_llama_gguf(
    path: str, types: Sequence[str], *, architecture: str = "llama", tie: bool = False, seed: int = 7
) -> dict:
  """Write the GGUF file; returns {'hf_model': the torch model, 'types': {gguf tensor name: type name}}."""
  import gguf  # pylint: disable=g-import-not-at-top

  model = hf_tiny.build_tiny_hf_torch_model("llama", seed=seed, vocab_size=256, tie_word_embeddings=tie)
  cfg = model.config
  writer = gguf.GGUFWriter(path, architecture)
  writer.add_name("tiny-llama")
  writer.add_block_count(cfg.num_hidden_layers)
  writer.add_context_length(cfg.max_position_embeddings)
  writer.add_embedding_length(cfg.hidden_size)
  writer.add_feed_forward_length(cfg.intermediate_size)
  writer.add_head_count(cfg.num_attention_heads)
  writer.add_head_count_kv(cfg.num_key_value_heads)
  writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
  writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
  writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
  writer.add_vocab_size(cfg.vocab_size)
  writer.add_bos_token_id(hf_tiny.BOS_ID)
  writer.add_eos_token_id(hf_tiny.EOS_ID)
  writer.add_pad_token_id(hf_tiny.PAD_ID)
  written, k = {}, 0
  for name, tensor in model.state_dict().items():
    if tie and name == "lm_head.weight":
      continue
    array = tensor.detach().float().numpy()
    if name.endswith("q_proj.weight"):
      array = llama_cpp_permute(array, cfg.num_attention_heads)
    elif name.endswith("k_proj.weight"):
      array = llama_cpp_permute(array, cfg.num_key_value_heads)
    kind = "F32" if array.ndim == 1 else types[k % len(types)]
    k += array.ndim == 2
    qtype = gguf.GGMLQuantizationType[kind]
    data = gguf.quants.quantize(array.astype(np.float32), qtype) if kind != "F32" else array.astype(np.float32)
    writer.add_tensor(gguf_name(name), data, raw_shape=data.shape if kind == "F32" else None, raw_dtype=qtype)
    written[gguf_name(name)] = kind
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return {"hf_model": model, "types": written}
