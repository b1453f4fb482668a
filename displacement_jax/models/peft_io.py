"""PEFT LoRA adapter directories <-> our adapter tree (models/lora.py), and the merged HF export.

An adapter directory is what `peft.PeftModel.from_pretrained(base, dir)` loads: `adapter_config.json`
(peft_type LORA, r, lora_alpha, lora_dropout, target_modules, ...) and `adapter_model.safetensors` with PEFT's
tensor names, `base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_A.weight [r, in]` and
`.lora_B.weight [out, r]` (ours are the transposes, stacked over the layers).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import numpy as np

from displacement_jax import rundir
from displacement_jax.models import convert, lora
from displacement_jax.models import io as io_lib
from displacement_jax.models.config import ModelConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model.model."
_NAME_RE = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(lora_A|lora_B)\.weight$")
# adapter_config.json keys whose non-default values this module cannot represent
_UNSUPPORTED = {
    "use_dora": False,
    "fan_in_fan_out": False,
    "bias": "none",
    "lora_bias": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "modules_to_save": None,
    "layers_to_transform": None,
}


def adapter_config(
    rank: int, config: ModelConfig, targets: tuple[str, ...], base_model_name_or_path: str | None = None
) -> dict[str, Any]:
  """The adapter_config.json of rank-`rank` adapters at `targets` with `config`'s alpha, dropout and rsLoRA."""
  return {
      "peft_type": "LORA",
      "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base_model_name_or_path,
      "r": int(rank),
      "lora_alpha": config.lora_alpha,
      "lora_dropout": config.lora_dropout,
      "use_rslora": config.lora_rslora,
      "target_modules": list(targets),
      "bias": "none",
      "fan_in_fan_out": False,
      "init_lora_weights": True,
      "inference_mode": True,
      "modules_to_save": None,
  }


def save_adapter(
    adapters: Mapping[str, Any], config: ModelConfig, out_dir: str, *, base_model_name_or_path: str | None = None
) -> str:
  """Write `adapters` (stacked tree, host or device arrays) as a PEFT adapter directory; returns `out_dir`."""
  nodes = lora.adapter_nodes(adapters)
  if not nodes:
    raise ValueError("save_adapter: the adapter tree is empty")
  targets = tuple(path[-1] for path in nodes)
  ranks = {int(np.shape(node["lora_A"])[-1]) for node in nodes.values()}
  if len(ranks) != 1:
    raise ValueError(f"save_adapter: adapters of several ranks {sorted(ranks)}; PEFT's config holds one r")
  tensors = []
  for path, node in nodes.items():
    module, proj = path[1], path[2]
    for leaf in lora.ADAPTER_LEAVES:
      stacked = np.asarray(io_lib._host_array(node[leaf]))  # pylint: disable=protected-access
      for i in range(stacked.shape[0]):
        name = f"{_PREFIX}layers.{i}.{module}.{proj}.{leaf}.weight"
        tensors.append((name, stacked[i].T.shape, stacked.dtype, stacked[i].T))
  tensors.sort(key=lambda t: t[0])
  os.makedirs(out_dir, exist_ok=True)
  io_lib._write_safetensors(os.path.join(out_dir, WEIGHTS_FILE), tensors, lambda a: a)  # pylint: disable=protected-access
  cfg = adapter_config(ranks.pop(), config, targets, base_model_name_or_path)
  rundir.write_json(os.path.join(out_dir, CONFIG_FILE), cfg, indent=2)
  return out_dir


def read_adapter_config(adapter_dir: str) -> dict[str, Any]:
  """adapter_config.json of a PEFT LoRA directory, checked: ValueError names the file and the field."""
  file = os.path.join(adapter_dir, CONFIG_FILE)
  if not os.path.isfile(file):
    raise ValueError(f"{adapter_dir}: no {CONFIG_FILE} (not a PEFT adapter directory)")
  with open(file) as f:
    cfg = json.load(f)
  if cfg.get("peft_type") != "LORA":
    raise ValueError(f"{file}: peft_type {cfg.get('peft_type')!r}, only 'LORA' adapters are supported")
  for key, default in _UNSUPPORTED.items():
    if cfg.get(key, default) not in (default, None, {}, False, "none"):
      raise ValueError(f"{file}: {key}={cfg[key]!r} is not supported (only {key}={default!r})")
  for key in ("r", "lora_alpha"):
    if not isinstance(cfg.get(key), (int, float)) or not cfg[key] > 0:
      raise ValueError(f"{file}: {key} must be a positive number, got {cfg.get(key)!r}")
  return cfg


def load_adapter(adapter_dir: str, config: ModelConfig, dtype: Any = np.float32) -> tuple[dict[str, Any], ModelConfig]:
  """(adapter tree in `dtype`, `config` with the adapter's alpha, dropout and rsLoRA) of a PEFT LoRA directory.

  ValueError names the file and the tensor for a name that is not a LoRA weight of this model, a wrong shape or a
  missing layer."""
  cfg = read_adapter_config(adapter_dir)
  file = os.path.join(adapter_dir, WEIGHTS_FILE)
  if not os.path.isfile(file):
    raise ValueError(f"{adapter_dir}: no {WEIGHTS_FILE} (only safetensors adapters are read)")
  header, data_start = io_lib.read_safetensors_header(file)
  rank = int(cfg["r"])
  shapes = convert.expected_layer_shapes(config)
  per_layer: dict[tuple[str, str, str], dict[int, np.ndarray]] = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    m = _NAME_RE.match(name)
    if not m or m.group(3) not in lora.MODULE_OF or lora.MODULE_OF[m.group(3)] != m.group(2):
      raise ValueError(f"{file}: tensor {name!r} is not a LoRA weight of a decoder projection")
    layer, module, proj, leaf = int(m.group(1)), m.group(2), m.group(3), m.group(4)
    if layer >= config.num_layers:
      raise ValueError(f"{file}: tensor {name!r}: the model has {config.num_layers} layers")
    n_in, n_out = shapes[(f"layers_{layer}", module, proj, "kernel")]
    want = (rank, n_in) if leaf == "lora_A" else (n_out, rank)
    array = io_lib.read_safetensors_tensor(file, info, data_start)
    if tuple(array.shape) != want:
      raise ValueError(f"{file}: tensor {name!r} has shape {tuple(array.shape)}, expected {want} (r={rank})")
    per_layer.setdefault((module, proj, leaf), {})[layer] = np.asarray(array, np.float32).T.astype(dtype)
  adapters: dict[str, Any] = {}
  for (module, proj, leaf), layers in per_layer.items():
    missing = sorted(set(range(config.num_layers)) - set(layers))
    if missing:
      raise ValueError(f"{file}: {module}.{proj}.{leaf} is missing for layers {missing[:8]}")
    adapters.setdefault("layers", {}).setdefault(module, {}).setdefault(proj, {})[leaf] = np.stack(
        [layers[i] for i in range(config.num_layers)]
    )
  if not adapters:
    raise ValueError(f"{file}: holds no LoRA weights")
  lora.adapter_nodes(adapters)  # both A and B of every adapted module
  model_config = lora.with_lora(config, cfg["lora_alpha"], cfg.get("lora_dropout", 0.0), cfg.get("use_rslora", False))
  return adapters, model_config


def save_merged(
    base: Mapping[str, Any], adapters: Mapping[str, Any], config: ModelConfig, out_dir: str, **kwargs: Any
) -> str:
  """A full HF checkpoint of the merged model (`lora.merge`, PEFT's merge_and_unload) via io.save_pretrained."""
  host = lambda tree: {k: host(v) if isinstance(v, Mapping) else io_lib._host_array(v) for k, v in tree.items()}  # pylint: disable=protected-access
  return io_lib.save_pretrained(lora.merge(host(base), host(adapters), config), config, out_dir, **kwargs)
