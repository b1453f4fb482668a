"""HF PyTorch state-dict names/tensors <-> our Flax param tree (pure numpy; no torch import).

HF `nn.Linear` stores `weight` as [out, in]; our Dense `kernel` is [in, out], so Linear weights are transposed.
Embeddings, norm weights and biases keep their layout. Gemma norm weights are stored raw (the model applies 1 + w).

The model scans one layer body over the decoder layers, so its tree holds each layer param once, stacked on a
leading layer axis: `layers/self_attn/q_proj/kernel [L, D, H*hd]`. HF names one tensor per layer
(`model.layers.3.self_attn.q_proj.weight`); at this boundary a layer tensor is addressed by its per-layer path
`('layers_3', 'self_attn', 'q_proj', 'kernel')` (`hf_name_to_path`, `expected_layer_shapes`), and
`stacked_path` / `layer_path` move between the two.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from displacement_jax.models.config import ModelConfig

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.original_inv_freq", "embed_tokens.embed_scale")
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(weight|bias)$")
_LAYER_NORM_RE = re.compile(
    r"^layers\.(\d+)\.(input_layernorm|post_attention_layernorm|pre_feedforward_layernorm|post_feedforward_layernorm)"
    r"\.weight$"
)
_QK_NORM_RE = re.compile(r"^layers\.(\d+)\.self_attn\.(q_norm|k_norm)\.weight$")
_SANDWICH_NORMS = ("pre_feedforward_layernorm", "post_feedforward_layernorm")
_ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP_PROJ = ("gate_proj", "up_proj", "down_proj")

Path = tuple[str, ...]


def _bias_allowed(config: ModelConfig, module: str, proj: str) -> bool:
  if module == "mlp":
    return config.mlp_bias
  return config.o_bias if proj == "o_proj" else config.qkv_bias


def hf_name_to_path(name: str, config: ModelConfig) -> Path | None:
  """Our param path for an HF state-dict name; None for buffers to ignore (rotary inv_freq, tied lm_head).

  Raises ValueError for names that do not belong to a `config.model_type` checkpoint.
  """
  if name.endswith(_IGNORED_SUFFIXES):
    return None
  if name == "lm_head.weight":
    return None if config.tie_word_embeddings else ("lm_head", "kernel")
  short = name[len("model.") :] if name.startswith("model.") else name
  has_norm = config.norm_type != "layernorm_nonparam"
  if short == "embed_tokens.weight":
    return ("embed_tokens", "embedding")
  if short == "norm.weight" and has_norm:
    return ("norm", "scale")
  m = _LAYER_NORM_RE.match(short)
  if (
      m
      and has_norm
      and int(m.group(1)) < config.num_layers
      and (config.sandwich_norm or m.group(2) not in _SANDWICH_NORMS)
  ):
    return (f"layers_{m.group(1)}", m.group(2), "scale")
  m = _QK_NORM_RE.match(short)
  if m and config.qk_norm and int(m.group(1)) < config.num_layers:
    return (f"layers_{m.group(1)}", "self_attn", m.group(2), "scale")
  m = _LAYER_RE.match(short)
  if m:
    layer, module, proj, kind = int(m.group(1)), m.group(2), m.group(3), m.group(4)
    valid = proj in (_ATTN_PROJ if module == "self_attn" else _MLP_PROJ)
    if valid and layer < config.num_layers and (kind == "weight" or _bias_allowed(config, module, proj)):
      return (f"layers_{layer}", module, proj, "kernel" if kind == "weight" else "bias")
  raise ValueError(
      f"HF tensor {name!r} does not belong to a {config.model_type} checkpoint with this config "
      f"(num_layers={config.num_layers}, qkv_bias={config.qkv_bias}, o_bias={config.o_bias}, "
      f"mlp_bias={config.mlp_bias}, norm_type={config.norm_type!r}, tie_word_embeddings={config.tie_word_embeddings})"
  )


def _is_linear(path: Path) -> bool:
  return path[-1] == "kernel"


def hf_tensor_to_param(name: str, array: np.ndarray, config: ModelConfig) -> np.ndarray:
  """The HF tensor `name` in our layout (Linear weights transposed to [in, out] kernels)."""
  path = hf_name_to_path(name, config)
  array = np.asarray(array)
  if path is not None and _is_linear(path):
    if array.ndim != 2:
      raise ValueError(f"HF tensor {name!r} must be 2-D (a Linear weight), got shape {array.shape}")
    return np.ascontiguousarray(array.T)
  return array


def _np_dtype(name: str) -> np.dtype:
  if name == "bfloat16":
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


LAYERS = "layers"


def stacked_path(path: Path) -> tuple[Path, int | None]:
  """(path in the stacked param tree, layer index) of a per-layer path; (path, None) outside the layers."""
  if path[0].startswith("layers_"):
    return (LAYERS,) + tuple(path[1:]), int(path[0][len("layers_") :])
  return path, None


def layer_path(path: Path, layer: int | None) -> Path:
  """The per-layer path of stacked-tree `path` at `layer` (the inverse of `stacked_path`)."""
  return path if layer is None else (f"layers_{layer}",) + tuple(path[1:])


def expected_param_shapes(config: ModelConfig) -> dict[str, Any]:
  """The param tree of `config` (layers stacked on a leading axis) with shape tuples as leaves."""
  tree = {}
  for path, shape in expected_layer_shapes(config).items():
    stacked, layer = stacked_path(path)
    if layer in (None, 0):
      set_in_tree(tree, stacked, shape if layer is None else (config.num_layers,) + shape)
  return tree


def stack_layers(flat: Mapping[Path, Any], config: ModelConfig) -> dict[str, Any]:
  """The stacked param tree from {per-layer path: array} (numpy; every layer must be present)."""
  tree: dict[str, Any] = {}
  for path in expected_layer_shapes(config):
    stacked, layer = stacked_path(path)
    if layer is None:
      set_in_tree(tree, stacked, flat[path])
    elif layer == 0:
      set_in_tree(tree, stacked, np.stack([np.asarray(flat[layer_path(stacked, i)]) for i in range(config.num_layers)]))
  return tree


def unstack_layers(params: Mapping[str, Any]) -> dict[Path, Any]:
  """{per-layer path: array} of a stacked param tree (the layer slices of each stacked leaf)."""
  out: dict[Path, Any] = {}
  for path, value in flatten_tree(params).items():
    if path[0] == LAYERS:
      for i in range(np.shape(value)[0]):
        out[layer_path(path, i)] = value[i]
    else:
      out[path] = value
  return out


def expected_layer_shapes(config: ModelConfig) -> dict[Path, tuple[int, ...]]:
  """{per-layer path: shape} of every param of `config`, in model order (HF granularity, see the module docstring)."""
  c = config
  d, f, q, kv = c.hidden_size, c.intermediate_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  has_norm = c.norm_type != "layernorm_nonparam"

  def dense(n_in: int, n_out: int, bias: bool) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {"kernel": (n_in, n_out)}
    if bias:
      out["bias"] = (n_out,)
    return out

  tree: dict[str, Any] = {"embed_tokens": {"embedding": (c.vocab_size, d)}}
  for i in range(c.num_layers):
    layer: dict[str, Any] = {}
    if has_norm:
      layer["input_layernorm"] = {"scale": (d,)}
    layer["self_attn"] = {
        "q_proj": dense(d, q, c.qkv_bias),
        "k_proj": dense(d, kv, c.qkv_bias),
        "v_proj": dense(d, kv, c.qkv_bias),
        "o_proj": dense(q, d, c.o_bias),
    }
    if c.qk_norm:
      layer["self_attn"].update(q_norm={"scale": (c.head_dim,)}, k_norm={"scale": (c.head_dim,)})
    if has_norm:
      layer["post_attention_layernorm"] = {"scale": (d,)}
    if c.sandwich_norm:
      layer["pre_feedforward_layernorm"] = {"scale": (d,)}
    layer["mlp"] = {
        "gate_proj": dense(d, f, c.mlp_bias),
        "up_proj": dense(d, f, c.mlp_bias),
        "down_proj": dense(f, d, c.mlp_bias),
    }
    if c.sandwich_norm:
      layer["post_feedforward_layernorm"] = {"scale": (d,)}
    tree[f"layers_{i}"] = layer
  if has_norm:
    tree["norm"] = {"scale": (d,)}
  if not c.tie_word_embeddings:
    tree["lm_head"] = {"kernel": (d, c.vocab_size)}
  return flatten_tree(tree)


def flatten_tree(tree: Mapping[str, Any], prefix: Path = ()) -> dict[Path, Any]:
  """{path tuple: leaf} of a nested mapping (param trees, shape trees, sharding trees)."""
  out: dict[Path, Any] = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten_tree(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def set_in_tree(tree: dict[str, Any], path: Path, value: Any) -> None:
  """tree[path[0]][path[1]]...[path[-1]] = value, creating the intermediate dicts."""
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def state_dict_to_params(
    state_dict: Mapping[str, np.ndarray], config: ModelConfig, *, dtype: str | None = None
) -> dict[str, Any]:
  """Convert a full HF state dict to our param tree of numpy arrays in `dtype` (default config.param_dtype).

  Raises ValueError naming the tensor on a wrong shape, an unknown name, or a missing parameter.
  """
  expected = expected_layer_shapes(config)
  target = _np_dtype(dtype or config.param_dtype)
  flat: dict[Path, Any] = {}
  seen: dict[Path, str] = {}
  for name, array in state_dict.items():
    path = hf_name_to_path(name, config)
    if path is None:
      continue
    if path in seen:
      raise ValueError(f"HF tensors {seen[path]!r} and {name!r} both map to param {'/'.join(path)}")
    value = hf_tensor_to_param(name, array, config)
    if tuple(value.shape) != expected[path]:
      hf_shape = tuple(np.shape(array))
      raise ValueError(
          f"HF tensor {name!r} has shape {hf_shape} (param {'/'.join(path)} {tuple(value.shape)}), "
          f"expected param shape {expected[path]} for this {config.model_type} config"
      )
    seen[path] = name
    flat[path] = value.astype(target, copy=False)
  missing = [p for p in expected if p not in seen]
  if missing:
    names = ", ".join("/".join(p) for p in missing[:8])
    raise ValueError(
        f"HF state dict is missing {len(missing)} parameter(s) for this {config.model_type} config: {names}"
    )
  return stack_layers(flat, config)


def param_path_to_hf_name(path: Path) -> str:
  """The HF state-dict name of our param at `path`."""
  if path == ("lm_head", "kernel"):
    return "lm_head.weight"
  if path[0].startswith("layers_"):
    layer = path[0][len("layers_") :]
    leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[path[-1]]
    return "model.layers." + layer + "." + ".".join(path[1:-1]) + "." + leaf
  leaf = {"embedding": "weight", "scale": "weight"}[path[-1]]
  return "model." + ".".join(path[:-1]) + "." + leaf


def params_to_state_dict(params: Mapping[str, Any], config: ModelConfig) -> dict[str, np.ndarray]:
  """HF names and layouts (Linear weights [out, in]) for our params; a tied lm_head is omitted."""
  expected = flatten_tree(expected_param_shapes(config))
  flat = flatten_tree(params)
  unknown = [p for p in flat if p not in expected]
  if unknown:
    raise ValueError(
        f"params has entries not in a {config.model_type} param tree: {['/'.join(p) for p in unknown[:8]]}"
    )
  missing = [p for p in expected if p not in flat]
  if missing:
    raise ValueError(f"params is missing entries: {['/'.join(p) for p in missing[:8]]}")
  for path, value in flat.items():
    if tuple(np.shape(value)) != expected[path]:
      raise ValueError(f"param {'/'.join(path)} has shape {np.shape(value)}, expected {expected[path]}")
  out: dict[str, np.ndarray] = {}
  for path, value in unstack_layers(params).items():
    value = np.asarray(value)
    if _is_linear(path):
      value = np.ascontiguousarray(value.T)
    out[param_path_to_hf_name(path)] = value
  return out
