"""One loader for every model source: a packaged model name, a .gguf file, an HF directory or a hub id."""

from __future__ import annotations

from typing import Any

from displacement_jax.models import gguf, io, packaged
from displacement_jax.models.config import ModelConfig
from displacement_jax.models.transformer import Transformer


def load(path_or_name: str, *, dtype: Any = 'float32', param_dtype: Any = None, mesh: Any = None, remat: bool = False,
         progress: bool = True) -> tuple[Transformer, dict[str, Any], ModelConfig]:
  """(model, params, config) from `models.from_gguf` for packaged names and .gguf files, else
  `models.from_pretrained` (HF safetensors directory or hub id)."""
  if packaged.is_gguf(path_or_name):
    return gguf.from_gguf(path_or_name, dtype=dtype, param_dtype=param_dtype, mesh=mesh, remat=remat, progress=progress)
  return io.from_pretrained(path_or_name, dtype=dtype, param_dtype=param_dtype, mesh=mesh, remat=remat,
                            progress=progress)
