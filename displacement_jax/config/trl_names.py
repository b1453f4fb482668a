"""TRL's DPOConfig names on our command line: `--beta=0.5` (or `--config.beta=0.5`) is `--config.loss.beta=0.5`.

`translate(argv)` rewrites every TRL name of `ALIASES` into our override and returns one line per name
("beta -> loss.beta"), which the CLI prints once. A TRL name or value we cannot honour exactly (a loss_type we do
not have, `max_prompt_length`, `rpo_alpha`, a logger other than TensorBoard) is a UsageError naming what to use
instead. The table (with each default here and in TRL) is docs/sections/trl.md's; `table_markdown()` writes it.
TRL's defaults were read from trl's source (main at f2cd577, 1.10.0.dev0, 2026-07; tags v0.28.0 and v0.29.0 for
what 0.29 removed) and, where DPOConfig inherits them, from transformers' TrainingArguments.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from displacement_jax.errors import UsageError


@dataclasses.dataclass(frozen=True)
class Alias:
  """One TRL name: our field(s) for a TRL value, both defaults, and what differs."""

  ours: str  # our config field ('' : no equivalent, the name is refused with `note`)
  ours_default: str
  trl_default: str
  note: str = ""
  convert: Callable[[str], list[tuple[str, str]]] | None = None  # TRL value -> [(our field, value)]


def _choice(name: str, mapping: dict[str, list[tuple[str, str]]], ours: str = "") -> Callable[[str], list]:
  """A converter of TRL value -> our (field, value) pairs; any other value is a UsageError naming the supported
  values (and `ours`, what else we offer)."""

  def convert(value: str) -> list[tuple[str, str]]:
    if value not in mapping:
      raise UsageError(f"--{name}={value}: not supported here; supported: {', '.join(mapping)}{ours}")
    return mapping[value]

  return convert


def _int_of(name: str, field: str) -> Callable[[str], list[tuple[str, str]]]:
  def convert(value: str) -> list[tuple[str, str]]:
    try:
      number = float(value)
    except ValueError:
      raise UsageError(f"--{name}={value}: expected a number") from None
    if number != int(number):
      raise UsageError(f"--{name}={value}: only whole numbers here ({field} is an int)")
    return [(field, str(int(number)))]

  return convert


def _max_steps(value: str) -> list[tuple[str, str]]:
  steps = int(float(value))
  return [("num_steps", str(max(steps, 0)))]  # TRL's -1 (= use num_train_epochs) is our 0


def _bool_to(field: str, true: str, false: str) -> Callable[[str], list[tuple[str, str]]]:
  return lambda value: [(field, true if value.lower() in ("true", "1", "yes") else false)]


LOSS_TYPES = {
    "sigmoid": [("loss.objective", "dpo")],
    "ipo": [("loss.objective", "ipo")],
    "hinge": [("loss.objective", "gpo"), ("loss.gpo_fn", "hinge")],
}
OPTIMIZERS = {n: [("optim.name", "adamw")] for n in ("adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw")}
OPTIMIZERS.update(rmsprop=[("optim.name", "rmsprop")], sgd=[("optim.name", "sgd")])
SCHEDULES = {
    "linear": [("optim.schedule", "linear")],
    "cosine": [("optim.schedule", "cosine")],
    "constant": [("optim.schedule", "constant")],
    "constant_with_warmup": [("optim.schedule", "constant")],  # our 'constant' takes optim.warmup_steps too
}
LOGGERS = {"tensorboard": [], "none": [], "all": []}  # metrics.jsonl and TensorBoard events are always written

ALIASES: dict[str, Alias] = {
    "beta": Alias("loss.beta", "0.1", "0.1"),
    "learning_rate": Alias("optim.lr", "1e-7 (the paper's)", "1e-6"),
    "per_device_train_batch_size": Alias(
        "batch_size",
        "32 (global: all devices, all micro-batches)",
        "8 per device",
        "our batch_size is the global batch: per-device x devices x gradient_accumulation_steps; the alias sets "
        "per-device x gradient_accumulation_steps (one device)",
    ),
    "gradient_accumulation_steps": Alias(
        "optim.grad_accum", "1", "1", "also multiplies batch_size when given with per_device_train_batch_size"
    ),
    "max_length": Alias("data.max_length", "512", "1024", "prompt + response tokens of one side, as TRL's"),
    "max_prompt_length": Alias(
        "",
        "-",
        "512 (TRL <= 0.28; removed in 0.29)",
        "no equivalent: prompts are never cut here; a pair longer than data.max_length has its response cut "
        "(data.truncation='truncate_response') or is an error ('error')",
    ),
    "max_completion_length": Alias(
        "", "-", "None (TRL <= 0.28; removed in 0.29)", "no equivalent: use data.max_length (prompt + response)"
    ),
    "loss_type": Alias(
        "loss.objective",
        "dpo",
        "sigmoid (TRL >= 0.29: a list, ['sigmoid'])",
        "sigmoid -> dpo; ipo -> ipo (TRL divides IPO's log-probs by the response length, ours uses the sums, as "
        "the paper); hinge -> gpo with loss.gpo_fn=hinge (relu(1 - beta h)); others are refused",
        _choice("loss_type", LOSS_TYPES, "; our other objectives: --config.loss.objective=slic|dpop|cross_entropy|gpo"),
    ),
    "rpo_alpha": Alias(
        "",
        "loss.sft_coeff 0",
        "None (TRL <= 0.28; removed in 0.29: loss_type=['sigmoid', 'sft'], loss_weights=[1, alpha])",
        "refused: TRL adds alpha x the chosen NLL averaged per token (over the batch's chosen response tokens); our "
        "loss.sft_coeff adds coeff x (-sum of the chosen's token log-probs), averaged over pairs; "
        "--config.loss.sft_coeff=alpha/(mean chosen tokens) matches",
    ),
    "label_smoothing": Alias(
        "loss.label_smoothing",
        "0.0",
        "0.0",
        "conservative DPO (cDPO), as TRL <= 0.28's sigmoid; TRL >= 0.29's sigmoid ignores it (only its robust, "
        "exo_pair and aot losses read it)",
    ),
    "num_train_epochs": Alias("num_epochs", "1", "3", "whole epochs only", _int_of("num_train_epochs", "num_epochs")),
    "max_steps": Alias("num_steps", "0 (off)", "-1 (off)", "", _max_steps),
    "report_to": Alias(
        "",
        "metrics.jsonl + TensorBoard, always",
        "'all' (installed loggers) with transformers < 5; 'none' with transformers >= 5",
        "tensorboard/none/all are accepted and change nothing; other loggers are refused",
        _choice("report_to", LOGGERS, " (metrics.jsonl and TensorBoard events are always written)"),
    ),
    "optim": Alias(
        "optim.name",
        "rmsprop (torch defaults)",
        "adamw_torch_fused with torch >= 2.8, else adamw_torch",
        "adamw_torch/adamw_torch_fused/adamw_hf (transformers < 5) -> adamw; rmsprop; sgd",
        _choice("optim", OPTIMIZERS),
    ),
    "lr_scheduler_type": Alias(
        "optim.schedule",
        "constant",
        "linear",
        "linear, cosine, constant, constant_with_warmup",
        _choice("lr_scheduler_type", SCHEDULES),
    ),
    "warmup_steps": Alias("optim.warmup_steps", "0", "0"),
    "max_grad_norm": Alias("optim.clip", "0.0 (off)", "1.0"),
    "weight_decay": Alias("optim.weight_decay", "0.0", "0.0"),
    "adam_beta1": Alias("optim.b1", "0.9", "0.9"),
    "adam_beta2": Alias("optim.b2", "0.999", "0.999"),
    "adam_epsilon": Alias("optim.eps", "1e-8", "1e-8"),
    "logging_steps": Alias("log_every", "1", "10"),
    "save_steps": Alias("checkpoint.every", "0 (only at the end)", "500"),
    "save_total_limit": Alias("checkpoint.keep", "1", "None (all)"),
    "eval_steps": Alias(
        "eval.every",
        "1 (configs/dpo.py: 10)",
        "None (logging_steps when eval_strategy='steps'; eval_strategy defaults to 'no')",
        "our eval is the displacement monitor",
    ),
    "gradient_checkpointing": Alias(
        "model.remat",
        "False",
        "True (TRL's; transformers' is False)",
        "trades speed for memory; the maths is unchanged",
        _bool_to("model.remat", "True", "False"),
    ),
    "bf16": Alias(
        "model.dtype",
        "float32",
        "True unless fp16 (TrainingArguments then errors where bf16 is unsupported, unless use_cpu)",
        "bf16=True -> model.dtype=bfloat16 (fp32 weights)",
        _bool_to("model.dtype", "bfloat16", "float32"),
    ),
    "seed": Alias("seed", "0", "42"),
    "output_dir": Alias("output_dir", "runs/default", "trainer_output"),
}


def _name_value(arg: str) -> tuple[str, str] | None:
  """(TRL name, value) of `--name=value`, `--config.name=value` or a bare boolean `--name`; else None."""
  if not arg.startswith("--"):
    return None
  body = arg[2:].removeprefix("config.")
  name, _, value = body.partition("=")
  if name not in ALIASES or (arg.startswith("--config.") and name in ("seed", "output_dir")):
    return None
  return name, value if "=" in body else "True"


def translate(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """(argv with every TRL name rewritten as our `--config.<field>=value`, one line per TRL name used)."""
  out, lines, given = [], [], {}
  for position, arg in enumerate(argv):
    parsed = _name_value(arg) if position else None
    if parsed is None:
      out.append(arg)
      continue
    given[parsed[0]] = parsed[1]
  if "per_device_train_batch_size" in given:
    per_device = int(float(given.pop("per_device_train_batch_size")))
    accum = int(float(given.get("gradient_accumulation_steps", "1")))
    out.append(f"--config.batch_size={per_device * accum}")
    lines.append(
        f"per_device_train_batch_size -> batch_size={per_device * accum} (our batch_size is the global batch: "
        "per-device x gradient_accumulation_steps here; times the devices on several)"
    )
  for name, value in given.items():
    alias = ALIASES[name]
    if not alias.ours and alias.convert is None:
      raise UsageError(f"--{name}: {alias.note}")
    pairs = alias.convert(value) if alias.convert else [(alias.ours, value)]
    out.extend(f"--config.{field}={v}" for field, v in pairs)
    mapped = ", ".join(f"{field}={v}" for field, v in pairs) if alias.convert else alias.ours
    lines.append(f"{name} -> {mapped or 'nothing (' + alias.note + ')'}")
  return out, lines


def table_markdown() -> str:
  """The TRL page's table: TRL name, our field, our default, TRL's default, the difference."""
  rows = ["| TRL `DPOConfig` | ours | default here | default in TRL | note |", "|---|---|---|---|---|"]
  for name, a in ALIASES.items():
    rows.append(f"| `{name}` | {f'`{a.ours}`' if a.ours else '-'} | {a.ours_default} | {a.trl_default} | {a.note} |")
  return "\n".join(rows)
