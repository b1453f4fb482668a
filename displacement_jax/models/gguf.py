"""GGUF checkpoints (llama.cpp's single-file format) -> (Transformer, params, ModelConfig), without torch.

Tensors are read as numpy memory maps and dequantized block by block to float32 with `gguf.quants.dequantize`
(llama.cpp's reference formulas; Q5_0 and the K-quants Q4_K/Q5_K/Q6_K with `models.quants`) for the types in
`SUPPORTED_TYPES`; any other type is
an error naming the tensor and its type. llama.cpp's converter permutes the rows of the Q and K projections
(it interleaves the two rotary halves of every head); `unpermute_qk` undoes it, so the weights are HF's again.
The architecture, sizes, RoPE base, norm epsilon and special-token ids come from the GGUF metadata (`llama.*`,
`tokenizer.ggml.*` keys); the tokenizer with its chat template goes through transformers' GGUF tokenizer
support (`models.tokenizer.load_tokenizer` on a .gguf path).
"""

from __future__ import annotations

import dataclasses
import os
import struct
from typing import Any, Mapping

import numpy as np

from displacement_jax.models import convert
from displacement_jax.models import io as io_lib
from displacement_jax.models.config import ModelConfig
from displacement_jax.models.transformer import Transformer
from displacement_jax.models import packaged
from displacement_jax.models import quants

SUPPORTED_ARCHITECTURES: tuple[str, ...] = ("llama", "gemma3")
SUPPORTED_TYPES: tuple[str, ...] = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", *quants.BLOCKS)

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GEMMA3_LAYER_NAMES = {  # llama.cpp's names of a Gemma-3 layer (its ffn_norm is the pre-feedforward norm)
    **{k: v for k, v in _LAYER_NAMES.items() if k != "ffn_norm.weight"},
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
_LAYER_NAMES_OF = {"llama": _LAYER_NAMES, "gemma3": _GEMMA3_LAYER_NAMES}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_IGNORED = ("rope_freqs.weight",)  # llama3 rope factors: derived from rope_scaling instead


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_PLAIN_DTYPES = {"F32": np.float32, "F16": np.float16}  # stored as numbers; every other type as raw blocks


@dataclasses.dataclass
class Tensor:
  """One tensor of a GGUF file: `shape` innermost dim first (as GGUF lists it), `data` a view of the file."""

  name: str
  tensor_type: Any  # gguf.GGMLQuantizationType
  shape: tuple[int, ...]
  data: np.ndarray


@dataclasses.dataclass
class Reader:
  """A GGUF file's metadata (`fields`: key -> Python value; arrays as lists) and tensors (memory-mapped)."""

  fields: dict[str, Any]
  tensors: list[Tensor]


def _parse(path: str) -> Reader:
  """Parse a GGUF (v2/v3) file: the header with struct over a memory map (the gguf package's reader builds a
  numpy view per value, 7 s for SmolLM2's 98k tokenizer strings; this takes well under a second), the tensors
  as views of the map in the gguf reader's layout (quantized types: [rows, bytes per row] uint8)."""
  import gguf  # pylint: disable=g-import-not-at-top

  mm = np.memmap(path, dtype=np.uint8, mode="r")
  buf = memoryview(mm)
  offset = 0

  def take(fmt: str) -> Any:
    nonlocal offset
    value = struct.unpack_from(fmt, buf, offset)[0]
    offset += struct.calcsize(fmt)
    return value

  def string() -> str:
    nonlocal offset
    n = take("<Q")
    value = bytes(buf[offset : offset + n]).decode("utf-8", errors="replace")
    offset += n
    return value

  def value(kind: int) -> Any:
    if kind == _STRING:
      return string()
    if kind == _ARRAY:
      item, count = take("<I"), take("<Q")
      if item in _SCALARS:  # one numpy read for a numeric array
        nonlocal offset
        dtype = np.dtype(_SCALARS[item])
        out = np.frombuffer(buf, dtype, count, offset).tolist()
        offset += dtype.itemsize * count
        return out
      return [value(item) for _ in range(count)]
    if kind not in _SCALARS:
      raise ValueError(f"unknown GGUF value type {kind}")
    return take(_SCALARS[kind])

  if bytes(buf[:4]) != b"GGUF":
    raise ValueError("no GGUF magic number")
  offset = 4
  version, tensor_count, kv_count = take("<I"), take("<Q"), take("<Q")
  if version not in (2, 3):
    raise ValueError(f"GGUF version {version} (supported: 2, 3)")
  fields = {}
  for _ in range(kv_count):
    key = string()
    fields[key] = value(take("<I"))
  infos = []
  for _ in range(tensor_count):
    name = string()
    dims = tuple(take("<Q") for _ in range(take("<I")))
    infos.append((name, dims, gguf.GGMLQuantizationType(take("<I")), take("<Q")))
  alignment = int(fields.get("general.alignment", 32))
  start = -(-offset // alignment) * alignment
  tensors = []
  for name, dims, kind, rel in infos:
    block, type_size = gguf.GGML_QUANT_SIZES[kind]
    n_bytes = int(np.prod(dims, dtype=np.int64)) * type_size // block
    raw = mm[start + rel : start + rel + n_bytes]
    if len(raw) != n_bytes:
      raise ValueError(f"tensor {name!r} runs past the end of the file")
    shape = tuple(reversed(dims))
    if kind.name in _PLAIN_DTYPES:
      data = raw.view(_PLAIN_DTYPES[kind.name]).reshape(shape)
    else:
      data = raw.reshape(*shape[:-1], shape[-1] // block * type_size)
    tensors.append(Tensor(name, kind, dims, data))
  return Reader(fields, tensors)


def open_reader(path: str) -> Reader:
  """The parsed GGUF file `path` (tensors stay memory-mapped); ValueError naming the file when unreadable."""
  if not os.path.isfile(path):
    raise ValueError(f"from_gguf: {path!r} is not a file")
  try:
    return _parse(path)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"from_gguf: {path}: not a readable GGUF file ({type(e).__name__}: {e})") from e


def has_tokenizer(path: str) -> bool:
  """Whether a GGUF file carries a tokenizer (tokenizer.ggml.model)."""
  return "tokenizer.ggml.model" in open_reader(path).fields


def read_metadata(reader: Reader) -> dict[str, Any]:
  """GGUF key -> value (scalars, strings, short lists); the tokenizer's long arrays are left out."""
  long_arrays = ("tokens", "scores", "token_type", "merges")
  return {
      key: value
      for key, value in reader.fields.items()
      if not (key.startswith("tokenizer.ggml.") and key.rsplit(".", 1)[-1] in long_arrays)
  }


def hf_config_from_metadata(
    meta: Mapping[str, Any], tensor_dims: Mapping[str, tuple[int, ...]], source: str
) -> dict[str, Any]:
  """An HF config.json dict from GGUF metadata (llama.cpp key names) and the tensors' dims (GGUF order, by name);
  ValueError names a missing key.

  Gemma-3 (`gemma3` -> model_type gemma3_text): what the metadata leaves out is what llama.cpp assumes: every
  6th layer full attention, the rest sliding-window; RoPE base 10000 in the sliding layers; attention scale
  1/sqrt(head_dim) (llama.cpp's rule for all sizes but 27B); vocab from token_embd."""
  arch = meta.get("general.architecture")
  if arch not in SUPPORTED_ARCHITECTURES:
    raise ValueError(
        f"from_gguf: {source}: unsupported GGUF architecture {arch!r}; supported: "
        f'{", ".join(SUPPORTED_ARCHITECTURES)}'
    )

  def need(key: str) -> Any:
    full = f"{arch}.{key}"
    if full not in meta:
      raise ValueError(f"from_gguf: {source}: GGUF metadata has no {full!r}")
    return meta[full]

  hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
  kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))
  head_dim = int(meta.get(f"{arch}.attention.key_length", meta.get(f"{arch}.rope.dimension_count", hidden // heads)))
  vocab = meta.get(f"{arch}.vocab_size")
  if vocab is None and arch == "gemma3" and "token_embd.weight" in tensor_dims:
    vocab = tensor_dims["token_embd.weight"][-1]
  if vocab is None:
    raise ValueError(f"from_gguf: {source}: GGUF metadata has no {arch}.vocab_size")
  hf: dict[str, Any] = {
      "model_type": arch,
      "vocab_size": int(vocab),
      "hidden_size": hidden,
      "intermediate_size": int(need("feed_forward_length")),
      "num_hidden_layers": int(need("block_count")),
      "num_attention_heads": heads,
      "num_key_value_heads": kv_heads,
      "head_dim": head_dim,
      "max_position_embeddings": int(meta.get(f"{arch}.context_length", 2048)),
      "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
      "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
      "tie_word_embeddings": "output.weight" not in tensor_dims,
      "hidden_act": "silu",
  }
  if arch == "gemma3":
    window, layers = meta.get(f"{arch}.attention.sliding_window"), hf["num_hidden_layers"]
    hf.update(
        model_type="gemma3_text",
        hidden_act="gelu_pytorch_tanh",
        query_pre_attn_scalar=head_dim,
        sliding_window=None if window is None else int(window),
        rope_local_base_freq=10000.0,
        layer_types=["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(layers)],
    )
  scaling_type = meta.get(f"{arch}.rope.scaling.type")
  if scaling_type not in (None, "none"):
    if scaling_type != "linear":
      raise ValueError(f"from_gguf: {source}: unsupported rope scaling type {scaling_type!r} (supported: linear)")
    hf["rope_scaling"] = {"rope_type": "linear", "factor": float(need("rope.scaling.factor"))}
  for key, name in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")):
    value = meta.get(f"tokenizer.ggml.{name}_token_id")
    hf[key] = None if value is None else int(value)
  return hf


def hf_name(gguf_name: str, arch: str = "llama") -> str | None:
  """The HF state-dict name of a GGUF tensor name of architecture `arch` (None for tensors to ignore);
  ValueError when unknown."""
  if gguf_name in _IGNORED:
    return None
  if gguf_name in _TOP_NAMES:
    return _TOP_NAMES[gguf_name]
  parts = gguf_name.split(".", 2)
  layer_names = _LAYER_NAMES_OF[arch]
  if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in layer_names:
    return f"model.layers.{parts[1]}.{layer_names[parts[2]]}"
  raise ValueError(f"GGUF tensor {gguf_name!r} is not part of a supported {arch} checkpoint")


def unpermute_qk(weight_OI: np.ndarray, num_heads: int) -> np.ndarray:
  """Undo llama.cpp's Q/K row permutation ([out, in] rows per head: interleaved -> rotate-half halves)."""
  out, rest = weight_OI.shape[0], weight_OI.shape[1:]
  half = out // num_heads // 2
  return weight_OI.reshape(num_heads, half, 2, *rest).swapaxes(1, 2).reshape(weight_OI.shape)


def dequantize(tensor: Any, source: str) -> np.ndarray:
  """One GGUF tensor as float32 in HF layout ([out, in] for a Linear weight)."""
  import gguf  # pylint: disable=g-import-not-at-top

  kind = tensor.tensor_type.name
  if kind not in SUPPORTED_TYPES:
    raise ValueError(
        f"from_gguf: {source}: tensor {tensor.name!r} has GGUF type {kind}, which is not supported "
        f'(supported: {", ".join(SUPPORTED_TYPES)})'
    )
  shape = tuple(int(s) for s in reversed(tensor.shape))  # GGUF lists dims innermost first
  if kind in quants.BLOCKS:  # Q5_0 and the K-quants: ours (tests/test_gguf.py: equal to gguf.quants.dequantize)
    values = quants.dequantize(np.asarray(tensor.data), kind, int(np.prod(shape)))
  else:
    values = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)  # float32 for the plain types too
  return np.asarray(values, np.float32).reshape(shape)


def read_state_dict(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, Any]]:
  """(HF-named float32 state dict, HF config dict, GGUF metadata) of a GGUF file: llama's Q/K rows un-permuted,
  Gemma-3's norm weights less the 1 llama.cpp's converter adds (HF's Gemma norms apply 1 + w)."""
  reader = open_reader(path)
  meta = read_metadata(reader)
  hf = hf_config_from_metadata(meta, {t.name: t.shape for t in reader.tensors}, path)
  arch = meta["general.architecture"]
  state: dict[str, np.ndarray] = {}
  for tensor in reader.tensors:
    name = hf_name(tensor.name, arch)
    if name is None:
      continue
    array = dequantize(tensor, path)
    if arch == "gemma3":
      if name.endswith("norm.weight"):
        array = array - np.float32(1.0)
    elif name.endswith("q_proj.weight"):
      array = unpermute_qk(array, hf["num_attention_heads"])
    elif name.endswith("k_proj.weight"):
      array = unpermute_qk(array, hf["num_key_value_heads"])
    state[name] = array
  return state, hf, meta


def from_gguf(
    path_or_packaged_name: str,
    *,
    dtype: Any = "float32",
    param_dtype: Any = None,
    mesh: Any = None,
    remat: bool = False,
    progress: bool = True,
) -> tuple[Transformer, dict[str, Any], ModelConfig]:
  """Load a GGUF file (or a packaged model name, see `models.packaged`) as (model, params, config).

  The same contract as `models.from_pretrained`: `dtype` is the compute dtype, `param_dtype` the storage dtype
  (default `dtype`); with `mesh`, every param is placed directly on its `sharding.param_shardings` sharding.
  """

  path = packaged.resolve_gguf(path_or_packaged_name)
  state, hf, _ = read_state_dict(path)
  config = ModelConfig.from_hf(hf, dtype=dtype, param_dtype=param_dtype or dtype, remat=remat)
  expected = convert.expected_layer_shapes(config)
  tensors = {}
  for name, array in state.items():
    param_path = convert.hf_name_to_path(name, config)
    if param_path is None:
      continue
    want = tuple(reversed(expected[param_path])) if param_path[-1] == "kernel" else expected[param_path]
    if array.shape != want:
      raise ValueError(f"from_gguf: {path}: tensor {name!r} has shape {array.shape}, expected {want} from the metadata")
    tensors[param_path] = array
  missing = [convert.param_path_to_hf_name(p) for p in expected if p not in tensors]
  if missing:
    raise ValueError(f'from_gguf: {path}: missing tensor(s) {", ".join(repr(n) for n in missing[:12])}')
  params = io_lib.place_tensors(tensors, config, mesh, desc=f"load {os.path.basename(path)}", progress=progress)
  return Transformer(config), params, config
