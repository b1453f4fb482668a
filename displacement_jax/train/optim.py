"""Optimizers for preference training: torch-default RMSprop, AdamW, SGD, schedules, clipping.

`make_optimizer(optim_config, num_steps)` builds an optax chain; gradient accumulation over micro-batches is
`displacement_jax.gradients.accumulate_gradients`.
"""

from __future__ import annotations

from typing import Any

import optax

OPTIMIZERS = ("rmsprop", "adamw", "sgd")
SCHEDULES = ("constant", "linear", "cosine")
GUARDS = ("state", "gradients")  # the train step's NaN/inf guard (step.make_train_step; config.optim.guard)


def make_schedule(name: str, lr: float, num_steps: int, warmup_steps: int = 0) -> optax.Schedule:
  """Learning-rate schedule: 'constant', 'linear' (warmup then decay to 0) or 'cosine' (warmup then cosine)."""
  if name not in SCHEDULES:
    raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {name!r}")
  if warmup_steps < 0:
    raise ValueError(f"optim.warmup_steps must be >= 0, got {warmup_steps}")
  if name == "constant":
    if warmup_steps == 0:
      return optax.constant_schedule(lr)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup_steps), optax.constant_schedule(lr)], [warmup_steps]
    )
  decay_steps = max(int(num_steps) - warmup_steps, 1)
  if name == "linear":
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, lr, max(warmup_steps, 1)) if warmup_steps else optax.constant_schedule(lr),
            optax.linear_schedule(lr, 0.0, decay_steps),
        ],
        [warmup_steps],
    )
  return optax.warmup_cosine_decay_schedule(0.0 if warmup_steps else lr, lr, warmup_steps, warmup_steps + decay_steps)


def torch_rmsprop(
    learning_rate: float | optax.Schedule, decay: float = 0.99, eps: float = 1e-8, momentum: float = 0.0
) -> optax.GradientTransformation:
  """torch.optim.RMSprop defaults: v <- a v + (1-a) g^2; p <- p - lr g / (sqrt(v) + eps)."""
  return optax.rmsprop(
      learning_rate, decay=decay, eps=eps, eps_in_sqrt=False, momentum=momentum or None, initial_scale=0.0
  )


def make_optimizer(optim_config: Any, num_steps: int) -> optax.GradientTransformation:
  """Build the optimizer from a config with fields name, lr, schedule, warmup_steps, clip, ... (configs/base.py)."""
  name = optim_config.name
  if name not in OPTIMIZERS:
    raise ValueError(f"optim.name must be one of {OPTIMIZERS}, got {name!r}")
  lr = float(optim_config.lr)
  if not lr > 0:
    raise ValueError(f"optim.lr must be > 0, got {lr}")
  schedule = make_schedule(
      optim_config.get("schedule", "constant"), lr, num_steps, int(optim_config.get("warmup_steps", 0))
  )
  if name == "rmsprop":
    opt = torch_rmsprop(
        schedule,
        decay=float(optim_config.get("decay", 0.99)),
        eps=float(optim_config.get("eps", 1e-8)),
        momentum=float(optim_config.get("momentum", 0.0)),
    )
  elif name == "adamw":
    opt = optax.adamw(
        schedule,
        b1=float(optim_config.get("b1", 0.9)),
        b2=float(optim_config.get("b2", 0.999)),
        eps=float(optim_config.get("eps", 1e-8)),
        weight_decay=float(optim_config.get("weight_decay", 0.0)),
    )
  else:
    opt = optax.sgd(schedule, momentum=float(optim_config.get("momentum", 0.0)) or None)
  clip = float(optim_config.get("clip", 0.0) or 0.0)
  if clip < 0:
    raise ValueError(f"optim.clip must be >= 0, got {clip}")
  if clip > 0:
    opt = optax.chain(optax.clip_by_global_norm(clip), opt)
  return opt
