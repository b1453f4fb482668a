"""One optimisation step of preference training: train state, configured loss, gradient-accumulating step.

`make_loss_fn` reads sequence log-probs through `forward.pair_logps` (either batch layout); reference
log-probs arrive in the batch (`chosen_ref_logps_B`, `rejected_ref_logps_B`), computed once before training.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from displacement_jax import forward
from displacement_jax import losses
from displacement_jax import displacement as monitor
from displacement_jax import gradients
from displacement_jax.train import optim as optim_lib


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint needs to continue training exactly (besides the data-iterator state)."""

  params: Any
  opt_state: Any
  step: jax.Array  # int32 scalar: optimizer steps taken
  rng: jax.Array  # uint32[2] raw key data (LoRA dropout's keys; kept so resumed runs stay reproducible)


def init_state(params: Any, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
  """The train state of `params` (every param, or LoRA's adapters) at step 0: fresh optimizer state, the seed's rng."""
  return TrainState(
      params=params,
      opt_state=optimizer.init(params),
      step=jnp.zeros((), jnp.int32),
      rng=jax.random.key_data(jax.random.key(int(seed))),
  )


def make_loss_fn(
    model: Any, loss_config: Any, chunk_size: int
) -> Callable[[Any, dict[str, jax.Array]], tuple[jax.Array, dict[str, jax.Array]]]:
  """loss_fn(params, batch) -> (scalar loss, metrics): the configured preference objective."""

  def loss_fn(params, batch):
    logps = forward.pair_logps(model, params, batch, chunk_size)
    pc, pr = logps["chosen_logps_B"], logps["rejected_logps_B"]
    rc, rr = batch["chosen_ref_logps_B"], batch["rejected_ref_logps_B"]
    loss, core_metrics = preference_loss(loss_config, pc, pr, rc, rr)
    aux = {
        **{k: v for k, v in core_metrics.items() if k != "loss"},
        "share_preferred_fell": jnp.mean(monitor.fell(pc - rc, rc, xp=jnp).astype(jnp.float32)),
    }
    for side in forward.SIDES:  # TRL: token-weighted mean over response positions of the mean-over-vocab logit
      positions = jnp.maximum(response_positions(batch, side), 1)
      aux[f"logits/{side}"] = jax.lax.stop_gradient(jnp.sum(logps[f"{side}_logit_sum_B"])) / positions
    return loss, aux

  return loss_fn


def preference_loss(
    loss_config: Any, pc: jax.Array, pr: jax.Array, rc: jax.Array, rr: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(loss, metrics) of `losses.preference_loss` with the fields of `loss_config` (configs/base.py `loss`)."""
  return losses.preference_loss(
      loss_config.objective,
      pc,
      pr,
      rc,
      rr,
      beta=float(loss_config.beta),
      sft_coeff=float(loss_config.get("sft_coeff", 0.0)),
      label_smoothing=float(loss_config.get("label_smoothing", 0.0)),
      slic_delta=float(loss_config.get("slic_delta", 1.0)),
      dpop_lambda=float(loss_config.get("dpop_lambda", 50.0)),
      gpo_fn=loss_config.get("gpo_fn", "logistic"),
  )


NONFINITE = ("", "loss", "gradient norm", "updated params", "optimizer state")  # metrics["nonfinite"] indexes it


def all_finite(tree: Any) -> jax.Array:
  """bool scalar: every floating leaf of `tree` is free of NaN/inf."""
  flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)


def make_train_step(
    loss_fn: Callable, optimizer: optax.GradientTransformation, grad_accum: int, guard: str = "state"
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
  """train_step(state, batch) -> (new state, metrics); gradients averaged over `grad_accum` micro-batches.

  NaN/inf guard (`metrics["nonfinite"]`: 0 when all checks pass, else the index in `NONFINITE` of the first that
  fails; a failed check skips the update, the returned state equals the input state):
  - guard='state': the loss, the gradient norm, the updated params and the optimizer state are checked, in that
    order, so the returned state always has all params finite and a caller that donates the state can still
    checkpoint the last good state before stopping. Costs two reads of the new state and a select over the whole
    state (BENCHMARKS.md: about a quarter of a memory-bound single-prompt step on the 2-core CPU).
  - guard='gradients': only the loss and the gradient norm, known BEFORE the update, so the update runs under a
    conditional (in place, or not at all) and nothing is selected afterwards. An optimizer overflow from finite
    gradients is not caught in this step (it shows as a non-finite loss one step later, when the input state is no
    longer the last good one).
  """
  if guard not in optim_lib.GUARDS:
    raise ValueError(f"guard must be one of {optim_lib.GUARDS}, got {guard!r}")

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    loss, aux, grads = gradients.accumulate_gradients(loss_fn, state.params, batch, grad_accum)
    grad_norm = optax.tree.norm(grads)
    checks = [jnp.isfinite(loss), jnp.isfinite(grad_norm)]

    def update(operands):
      params, opt_state, grads = operands
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    if guard == "gradients":  # a conditional, not a select: the update runs in place or not at all
      params, opt_state = jax.lax.cond(
          jnp.all(jnp.stack(checks)), update, lambda ops: ops[:2], (state.params, state.opt_state, grads)
      )
    else:
      params, opt_state = update((state.params, state.opt_state, grads))
      checks += [all_finite(params), all_finite(opt_state)]
    first_bad = jnp.argmin(jnp.stack(checks))  # index of the first False (0 when all are True)
    finite = jnp.all(jnp.stack(checks))
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "tokens": forward.token_count(batch),
        "nonfinite": jnp.where(finite, 0, first_bad + 1).astype(jnp.int32),
        **aux,
    }
    new_state = state.replace(
        params=params,
        opt_state=opt_state,
        step=state.step + 1,
        rng=jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(state.rng), 0)),
    )
    keep = lambda new, old: jnp.where(finite, new, old)
    if guard == "gradients":  # params and optimizer state already kept their values on a skip
      return new_state.replace(step=keep(new_state.step, state.step), rng=keep(new_state.rng, state.rng)), metrics
    return jax.tree.map(keep, new_state, state), metrics

  return train_step


def response_positions(batch: dict[str, jax.Array], side: str) -> jax.Array:
  """Number of response (loss) positions of `side` in a batch of either layout, float32 scalar."""
  if "response_side_BR" in batch:
    return jnp.sum(batch["response_side_BR"] == forward.SIDES.index(side) + 1, dtype=jnp.float32)
  return jnp.sum(batch[f"{side}_loss_mask_BT"], dtype=jnp.float32)
