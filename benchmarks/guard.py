r"""The train step's NaN/inf guard on a memory-bound step: single-prompt DPO in single-token mode.

  python -m benchmarks.guard --shape=smollm2-135m --prompt_len=64 --append=BENCHMARKS.md

The step the demo, the theory check and the persona pipeline take (`experiments.single_token.single_token_loss_fn`
+ `step.make_train_step`, RMSprop, the state donated) on one random prompt, with random weights of the shape, for
each `optim.guard` ('state': loss, gradient, updated params and optimizer state, the state selected afterwards;
'gradients': loss and gradient before the update, the skip fused into it) and, as the floor, the same step without
any guard. Compile time and the median seconds per step over interleaved rounds (the variants alternate, so a
shared machine's load hits them alike).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from benchmarks import cpu_vs_torch, shapes, tables
from displacement_jax import gradients
from displacement_jax.train import optim as optim_lib
from displacement_jax.train import step as step_lib
from displacement_jax.experiments import single_token


def unguarded_step(loss_fn, optimizer):
  """make_train_step without any check: the floor a guard is measured against."""

  def train_step(state, batch):
    loss, aux, grads = gradients.accumulate_gradients(loss_fn, state.params, batch, 1)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(params=params, opt_state=opt_state, step=state.step + 1), {"loss": loss, **aux}

  return train_step


def prompt_batch(vocab: int, prompt_len: int, seed: int = 0) -> dict[str, jax.Array]:
  """One single-token pair: a random prompt, y+ = 10, y- = 11, both sides sharing the prompt."""
  ids = np.random.default_rng(seed).integers(12, vocab, size=prompt_len + 1).astype(np.int32)
  batch = {}
  for side, tok in (("chosen", 10), ("rejected", 11)):
    ids_side = ids.copy()
    ids_side[-1] = tok
    labels = np.full(prompt_len + 1, -100, np.int32)
    labels[prompt_len - 1] = tok
    loss_mask = (labels >= 0).astype(np.int32)
    batch.update(
        {
            f"{side}_input_ids_BT": ids_side[None],
            f"{side}_attention_mask_BT": np.ones((1, prompt_len + 1), np.int32),
            f"{side}_labels_BT": labels[None],
            f"{side}_loss_mask_BT": loss_mask[None],
        }
    )
  out = {k: jnp.asarray(v) for k, v in batch.items()}
  out.update(y_pos_B=jnp.asarray([10]), y_neg_B=jnp.asarray([11]), ref_pos_B=jnp.zeros(1), ref_neg_B=jnp.zeros(1))
  return out


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
  parser.add_argument("--shape", default="smollm2-135m", choices=sorted(shapes.SHAPES))
  parser.add_argument("--prompt_len", type=int, default=64)
  parser.add_argument("--rounds", type=int, default=4)
  parser.add_argument("--steps", type=int, default=5, help="steps per round and variant")
  parser.add_argument("--append", default="")
  args = parser.parse_args(argv)
  _, model, params, _ = cpu_vs_torch.build_models(args.shape)
  batch = prompt_batch(shapes.SHAPES[args.shape]["vocab_size"], args.prompt_len)
  loss_cfg = ml_collections.ConfigDict({"objective": "dpo", "beta": 0.1})
  loss_fn = single_token.single_token_loss_fn(model, loss_cfg)
  optimizer = optim_lib.make_optimizer(ml_collections.ConfigDict({"name": "rmsprop", "lr": 1e-7}), 100)
  variants = {f"guard='{g}'": step_lib.make_train_step(loss_fn, optimizer, 1, g) for g in optim_lib.GUARDS}
  variants["no guard (floor)"] = unguarded_step(loss_fn, optimizer)
  steps, states, compile_s = {}, {}, {}
  for name, fn in variants.items():
    steps[name] = jax.jit(fn, donate_argnums=0)
    states[name] = step_lib.TrainState(
        params=jax.tree.map(jnp.copy, params),
        opt_state=optimizer.init(params),
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(jax.random.key(0)),
    )
    start = time.perf_counter()
    steps[name] = steps[name].lower(states[name], batch).compile()
    compile_s[name] = time.perf_counter() - start
    states[name], _ = steps[name](states[name], batch)  # warm
  seconds = {name: [] for name in variants}
  for _ in range(args.rounds):
    for name in variants:
      start = time.perf_counter()
      for _ in range(args.steps):
        states[name], metrics = steps[name](states[name], batch)
      jax.block_until_ready((states[name], metrics))
      seconds[name].append((time.perf_counter() - start) / args.steps)
  floor = float(np.median(seconds["no guard (floor)"]))
  lines = [
      f"### NaN/inf guard of the train step: shape `{args.shape}`, one prompt of {args.prompt_len} tokens "
      f"({datetime.date.today()})",
      "",
      f"Command: `python -m benchmarks.guard --shape={args.shape} --prompt_len={args.prompt_len}`  ",
      f"Single-token DPO step on one prompt (the demo's), RMSprop, state donated; median of {args.rounds} "
      f"interleaved rounds of {args.steps} steps.",
      "",
      "| step | compile | s / step | vs no guard |",
      "|---|---|---|---|",
  ]
  for name in variants:
    med = float(np.median(seconds[name]))
    lines.append(f"| {name} | {compile_s[name]:.1f} s | {med:.3f} | {med / floor:.2f}x |")
  tables.emit(lines, args.append)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
