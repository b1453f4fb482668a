"""The HF export of a training run: the trained params, the tokenizer and the generation config in HF format.

`export_hf` writes into `out_dir`.partial, completes it with its manifest (EXPORT_MANIFEST: checksums and the
params' sha256, written last) and renames it to `out_dir`; `export_problem` says whether an existing export is
complete and holds these params (a --resume of a finished run exports again when it does not).
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import jax
import numpy as np

from displacement_jax import rundir, runtime
from displacement_jax.errors import Interrupted
from displacement_jax.models import io as io_lib
from displacement_jax.models import loading as loading_lib
from displacement_jax.train.metrics import log
from displacement_jax.train import lora as lora_train

HF_DIR = "hf"  # the HF export, under output_dir
EXPORT_MANIFEST = "export.json"  # written last into the export: its files' checksums and the params' sha256


class ExportError(OSError):
  """The HF export failed; the checkpoints are kept and `--resume` exports again."""


def host_params(params: Any) -> Any:
  """Numpy copy of (possibly sharded, multi-host) params on every host."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top  (multi-host only)

    return multihost_utils.process_allgather(params, tiled=True)
  return jax.device_get(params)


def params_digest(params: Any) -> str:
  """sha256 of every leaf of a (host numpy) param tree: what an export's manifest records of its params."""
  return rundir.hash_arrays(np.asarray(x) for x in jax.tree.leaves(params))


def export_problem(hf_dir: str, params: Any) -> str | None:
  """None when `hf_dir` is a complete export of `params` (its manifest, written last, verifies and names these
  params), else what is wrong with it."""
  if not os.path.isdir(hf_dir):
    return "no export"
  record = rundir.read_manifest(hf_dir, EXPORT_MANIFEST)
  if record is None:
    return f"no readable {EXPORT_MANIFEST}: the export never completed"
  if record.get("params_sha256") != params_digest(params):
    return "it holds other params than this run's (an earlier run's export)"
  return rundir.check_digests(hf_dir, EXPORT_MANIFEST)


def export_hf(params: Any, loaded: runtime.Loaded, out_dir: str, *, progress: bool = True) -> str:
  """Save the trained params, the tokenizer and the source's generation config in HF format
  (models.io.save_pretrained): what the source checkpoint had, nothing of how this machine loaded it.

  Written into `out_dir`.partial, completed by its manifest (EXPORT_MANIFEST: checksums and the params' sha256,
  written last), then renamed to `out_dir`: an `out_dir` is always a complete export. A failure raises
  ExportError in one line (the checkpoints are kept; --resume exports again).
  """
  partial, writer = out_dir + ".partial", jax.process_index() == 0
  try:
    if writer:
      shutil.rmtree(partial, ignore_errors=True)
    if loaded.lora is not None:  # a PEFT adapter directory (+ merged/ with model.lora.merge)
      lora_train.save(params, loaded, partial, progress=progress)
    else:
      io_lib.save_pretrained(params, loaded.model_config, partial, progress=progress)
    if writer:
      if hasattr(loaded.tokenizer, "save_pretrained"):
        loaded.tokenizer.save_pretrained(partial)
      source = loaded.identity.get("path")
      generation = loading_lib.generation_config(source, loaded.model_config) if source else None
      if generation is not None:
        rundir.write_json(os.path.join(partial, "generation_config.json"), generation, indent=2)
      rundir.write_digests(partial, EXPORT_MANIFEST, params_sha256=params_digest(params))
      rundir.replace_dir(partial, out_dir)
  except Interrupted:
    raise
  except Exception as e:  # pylint: disable=broad-except  (any failure: one line, the run's checkpoints are kept)
    lines = [line for line in str(e).splitlines() if line.strip()]
    reason = f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    raise ExportError(
        f"the HF export to {out_dir} failed ({reason}); the checkpoints are kept: --resume exports again"
    ) from e
  log(f"exported HF model to {out_dir}")
  return out_dir
