"""Config checks shared by the entry points, run before any model is loaded (ValueError naming the field)."""

from __future__ import annotations

import ml_collections

from displacement_jax import filtering, losses


def check_common(config: ml_collections.ConfigDict) -> None:
  """The fields every run needs: exactly one model source, a data path and an output directory."""
  if bool(config.model.get("path")) == bool(config.model.get("tiny")):
    raise ValueError(
        "exactly one of config.model.path and config.model.tiny must be set, got "
        f'path={config.model.get("path")!r} tiny={config.model.get("tiny")!r}'
    )
  if not config.data.get("path"):
    raise ValueError("config.data.path must name a preference jsonl file or dataset id")
  if not config.get("output_dir"):
    raise ValueError("config.output_dir must be set")


def check_train(config: ml_collections.ConfigDict) -> None:
  """Training configs: `check_common` plus objective, batch size, accumulation and length of the run."""
  check_common(config)
  if config.loss.objective not in losses.OBJECTIVES:
    raise ValueError(f"config.loss.objective must be one of {losses.OBJECTIVES}, got {config.loss.objective!r}")
  if config.batch_size < 1:
    raise ValueError(f"config.batch_size must be >= 1, got {config.batch_size}")
  accum = int(config.optim.grad_accum)
  if accum < 1 or config.batch_size % accum:
    raise ValueError(
        f"config.batch_size={config.batch_size} must be a positive multiple of " f"config.optim.grad_accum={accum}"
    )
  if config.num_steps <= 0 and config.num_epochs <= 0:
    raise ValueError("set config.num_steps > 0 or config.num_epochs > 0")


def check_score(config: ml_collections.ConfigDict) -> None:
  """Scoring configs: `check_common` plus the filter mode."""
  check_common(config)
  mode = config.get("filter", ml_collections.ConfigDict({"mode": "none"})).get("mode", "none")
  if mode not in filtering.MODES:
    raise ValueError(f"config.filter.mode must be one of {filtering.MODES}, got {mode!r}")
