"""One loader for every model source: a packaged model name, a .gguf file, an HF directory or a hub id."""

from __future__ import annotations

import json
import os
from typing import Any

from displacement_jax.models import gguf, packaged
from displacement_jax.models import io as io_lib
from displacement_jax.models.config import ModelConfig
from displacement_jax.models.transformer import Transformer


def load(
    path_or_name: str,
    *,
    dtype: Any = "float32",
    param_dtype: Any = None,
    mesh: Any = None,
    remat: bool = False,
    progress: bool = True,
) -> tuple[Transformer, dict[str, Any], ModelConfig]:
  """(model, params, config) from `models.from_gguf` for packaged names and .gguf files, else
  `models.from_pretrained` (HF safetensors directory or hub id)."""
  if packaged.is_gguf(path_or_name):
    return gguf.from_gguf(path_or_name, dtype=dtype, param_dtype=param_dtype, mesh=mesh, remat=remat, progress=progress)
  return io_lib.from_pretrained(
      path_or_name, dtype=dtype, param_dtype=param_dtype, mesh=mesh, remat=remat, progress=progress
  )


def generation_config(path_or_name: str, config: ModelConfig) -> dict[str, Any] | None:
  """The source checkpoint's generation config, to export beside a trained model: an HF directory's own
  generation_config.json (None when it has none), or for a GGUF source its bos/eos/pad ids."""
  if packaged.is_gguf(path_or_name):
    eos = list(config.eos_token_ids)
    ids = {
        "bos_token_id": config.bos_token_id,
        "pad_token_id": config.pad_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
    }
    return {k: v for k, v in ids.items() if v not in (None, [])}
  file = os.path.join(io_lib.resolve_checkpoint_dir(path_or_name), "generation_config.json")
  if not os.path.isfile(file):
    return None
  with open(file) as f:
    return json.load(f)
