"""Config checks shared by the entry points, run before any model is loaded (ValueError naming the field), and
the comparison of a --resume config with the one its checkpoint was written under (`resume_changes`)."""

from __future__ import annotations

import math
from typing import Any, Mapping

import ml_collections

from displacement_jax import losses
from displacement_jax.score import filtering
from displacement_jax.train import optim
from displacement_jax.data import tokenize

# --resume: fields whose change alters the optimisation (refused unless config.resume_allow_changes), by prefix;
# the exceptions change how a run is computed or reported, not what it computes.
OPTIMISATION_FIELDS = ("loss.", "optim.", "model.", "data.", "batch_size", "seed")
RESUME_SAFE_FIELDS = ("model.remat", "data.padding_side", "data.shared_prompt_packing", "data.pairs_per_row")
STEP_COUNT_FIELDS = ("num_steps", "num_epochs")  # safe unless the learning-rate schedule depends on them
BETA_OBJECTIVES = ("dpo", "ipo", "gpo", "dpop")


def _int_at_least(name: str, value: Any, *, minimum: int = 1) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"config.{name} must be an integer >= {minimum}, got {value!r}")


def _finite_number(name: str, value: Any, *, low: float | None = None, positive: bool = False) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise ValueError(f"config.{name} must be a finite number, got {value!r}")
  if positive and not value > 0:
    raise ValueError(f"config.{name} must be > 0, got {value!r}")
  if low is not None and value < low:
    raise ValueError(f"config.{name} must be >= {low}, got {value!r}")
  return float(value)


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(f"config.{name} must be one of {choices}, got {value!r}")


def check_common(config: ml_collections.ConfigDict) -> None:
  """The fields every run needs: exactly one model source, a data path, an output directory, a sane data block."""
  if bool(config.model.get("path")) == bool(config.model.get("tiny")):
    raise ValueError(
        "exactly one of config.model.path and config.model.tiny must be set, got "
        f'path={config.model.get("path")!r} tiny={config.model.get("tiny")!r}'
    )
  if not config.data.get("path"):
    raise ValueError("config.data.path must name a preference jsonl file or dataset id")
  if not config.get("output_dir"):
    raise ValueError("config.output_dir must be set")
  _int_at_least("batch_size", config.get("batch_size", 1))
  dc = config.data
  _int_at_least("data.max_length", dc.get("max_length", 512), minimum=2)
  _choice("data.format", dc.get("format", "raw"), tokenize.FORMATS)
  _choice("data.truncation", dc.get("truncation", "truncate_response"), tokenize.TRUNCATION_POLICIES)
  _choice("data.tokenization", dc.get("tokenization", "separate"), tokenize.TOKENIZATIONS)
  _choice("data.padding_side", dc.get("padding_side", "right"), ("right", "left"))
  _int_at_least("data.limit", dc.get("limit", 0) or 0, minimum=0)
  _int_at_least("data.pairs_per_row", dc.get("pairs_per_row", 1))


def check_train(config: ml_collections.ConfigDict) -> None:
  """Training configs: `check_common` plus objective and its coefficients, optimizer, batch size,
  accumulation, length of the run and checkpointing."""
  check_common(config)
  if config.loss.objective not in losses.OBJECTIVES:
    raise ValueError(f"config.loss.objective must be one of {losses.OBJECTIVES}, got {config.loss.objective!r}")
  if config.loss.objective in BETA_OBJECTIVES:
    _finite_number("loss.beta", config.loss.get("beta", 0.1), positive=True)
  _finite_number("loss.sft_coeff", config.loss.get("sft_coeff", 0.0), low=0.0)
  smoothing = _finite_number("loss.label_smoothing", config.loss.get("label_smoothing", 0.0), low=0.0)
  if smoothing >= 0.5:
    raise ValueError(f"config.loss.label_smoothing must be in [0, 0.5), got {smoothing}")
  oc = config.optim
  _choice("optim.name", oc.get("name", "rmsprop"), optim.OPTIMIZERS)
  _finite_number("optim.lr", oc.get("lr"), positive=True)
  _choice("optim.schedule", oc.get("schedule", "constant"), optim.SCHEDULES)
  _choice("optim.guard", oc.get("guard", "state"), optim.GUARDS)
  _int_at_least("optim.warmup_steps", oc.get("warmup_steps", 0), minimum=0)
  _finite_number("optim.clip", oc.get("clip", 0.0) or 0.0, low=0.0)
  for name in ("weight_decay", "momentum", "eps"):
    _finite_number(f"optim.{name}", oc.get(name, 0.0), low=0.0)
  if config.batch_size < 1:
    raise ValueError(f"config.batch_size must be >= 1, got {config.batch_size}")
  accum = int(config.optim.grad_accum)
  if accum < 1 or config.batch_size % accum:
    raise ValueError(
        f"config.batch_size={config.batch_size} must be a positive multiple of " f"config.optim.grad_accum={accum}"
    )
  _int_at_least("num_steps", config.num_steps, minimum=0)  # 0: num_epochs decides
  _int_at_least("num_epochs", config.num_epochs, minimum=0)
  if config.num_steps <= 0 and config.num_epochs <= 0:
    raise ValueError("set config.num_steps > 0 or config.num_epochs > 0")
  _int_at_least("checkpoint.every", config.checkpoint.get("every", 0), minimum=0)
  _int_at_least("checkpoint.keep", config.checkpoint.get("keep", 2))
  _int_at_least("eval.every", config.eval.get("every", 1), minimum=0)


def check_score(config: ml_collections.ConfigDict) -> None:
  """Scoring configs: `check_common` plus the filter mode."""
  check_common(config)
  mode = config.get("filter", ml_collections.ConfigDict({"mode": "none"})).get("mode", "none")
  if mode not in filtering.MODES:
    raise ValueError(f"config.filter.mode must be one of {filtering.MODES}, got {mode!r}")


# ------------------------------------------------------------------------------------------------- --resume


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{'optim.lr': 1e-7, ...} of a nested dict / ConfigDict."""
  out = {}
  for key, value in tree.items():
    if hasattr(value, "items"):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
  return out


def resume_changes(stored: Mapping[str, Any], config: ml_collections.ConfigDict) -> tuple[list[str], list[str]]:
  """(refused, allowed): 'field old -> new' of every field where `config` differs from the `stored` config of a
  checkpoint; refused are those that alter the optimisation (OPTIMISATION_FIELDS; num_steps / num_epochs when
  the learning-rate schedule is not constant)."""
  old, new = flatten(stored), flatten(config.to_dict())
  schedule_fixed = new.get("optim.schedule", "constant") == "constant"
  refused, allowed = [], []
  for field in sorted(set(old) | set(new)):
    if field in ("resume_allow_changes", "overwrite") or old.get(field) == new.get(field):
      continue
    line = f"{field} {old.get(field, '<unset>')!r} -> {new.get(field, '<unset>')!r}"
    alters = field.startswith(OPTIMISATION_FIELDS) and field not in RESUME_SAFE_FIELDS
    alters = alters or (field in STEP_COUNT_FIELDS and not schedule_fixed)
    (refused if alters else allowed).append(line)
  return refused, allowed
