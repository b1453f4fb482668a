r"""Same-run A/B of the packed DPO train step with and without two of its optimisations.

  python -m benchmarks.step_ablation --shape=cpu --rounds=2 --steps=4 --append=BENCHMARKS.md

The step of `benchmarks.cpu_vs_torch` (8 random-length pairs, 2 per packed row, RMSprop, the state donated) in
three variants: 'current' (the library as it is); 'no LM-head skip' (the response slots reach
`logprobs.chunked_token_logprobs` without their mask, so the chunks holding only padding are computed as before
2026-12-05); 'autodiff attention' (each attention block differentiated by autodiff, which keeps its [T, S]
probabilities for the backward pass, instead of `transformer.recompute_attention`'s recomputation). The two
ablations swap those functions for the run only. Reported: compile time, the compiled step's temporary memory
(XLA's memory analysis), the median seconds per step over interleaved rounds (the variants alternate, so a shared
machine's load hits them alike) and the chosen log-probs after the steps against 'current'.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import sys
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from benchmarks import cpu_vs_torch, shapes, tables
from displacement_jax import forward, logprobs
from displacement_jax.train import optim
from displacement_jax.train import step as step_lib
from displacement_jax.models import transformer


@contextlib.contextmanager
def without_head_skip() -> Iterator[None]:
  """chunked_token_logprobs called without its mask (masked labels zeroed): every chunk is computed."""
  masked = logprobs.chunked_token_logprobs

  def unmasked(hidden_BTD, unembed_DV, labels_BT, *, chunk_size, mask_BT=None):
    if mask_BT is not None:
      labels_BT = jnp.where(mask_BT, labels_BT, 0)
    return masked(hidden_BTD, unembed_DV, labels_BT, chunk_size=chunk_size)

  logprobs.chunked_token_logprobs = unmasked
  try:
    yield
  finally:
    logprobs.chunked_token_logprobs = masked


@contextlib.contextmanager
def autodiff_attention() -> Iterator[None]:
  """Each attention block through `reference_attention` (autodiff keeps the probabilities)."""
  recompute = transformer.recompute_attention

  def plain(q_BTKGH, k_BSKH, v_BSKH, mask_BTS, scale):
    b, t, k, g, h = q_BTKGH.shape
    return transformer.reference_attention(q_BTKGH.reshape(b, t, k * g, h), k_BSKH, v_BSKH, mask_BTS, scale).reshape(
        q_BTKGH.shape
    )

  transformer.recompute_attention = plain
  try:
    yield
  finally:
    transformer.recompute_attention = recompute


VARIANTS: dict[str, Callable[[], contextlib.AbstractContextManager]] = {
    "current": contextlib.nullcontext,
    "no LM-head skip": without_head_skip,
    "autodiff attention": autodiff_attention,
}


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
  parser.add_argument("--shape", default="cpu", choices=sorted(shapes.SHAPES))
  parser.add_argument("--pairs", type=int, default=8)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--steps", type=int, default=4, help="timed steps per round and variant")
  parser.add_argument("--append", default="")
  args = parser.parse_args(argv)

  _, model, params, config = cpu_vs_torch.build_models(args.shape)
  rows = cpu_vs_torch.random_rows(args.pairs, config.vocab_size, prompt_len=(16, 96), response_len=(8, 192))
  batch = cpu_vs_torch.train_layout(rows, 2)
  ref = forward.pair_logps(model, params, batch, chunk_size=128)
  jbatch = jax.device_put(
      dict(batch, chosen_ref_logps_B=ref["chosen_logps_B"], rejected_ref_logps_B=ref["rejected_logps_B"])
  )
  loss_cfg = ml_collections.ConfigDict(dict(objective="dpo", beta=0.1, sft_coeff=0.0, label_smoothing=0.0))
  optimizer = optim.make_optimizer(ml_collections.ConfigDict(dict(name="rmsprop", lr=1e-5)), 100)
  fresh = lambda: step_lib.TrainState(
      params=jax.tree.map(jnp.copy, params),
      opt_state=optimizer.init(params),
      step=jnp.zeros((), jnp.int32),
      rng=jax.random.key_data(jax.random.key(0)),
  )

  compiled: dict[str, Any] = {}
  stats: dict[str, dict[str, Any]] = {}
  for name, swap in VARIANTS.items():
    with swap():
      fn = jax.jit(
          step_lib.make_train_step(step_lib.make_loss_fn(model, loss_cfg, 128), optimizer, 1), donate_argnums=0
      )
      t0 = time.perf_counter()
      compiled[name] = fn.lower(fresh(), jbatch).compile()
      memory = compiled[name].memory_analysis()
      stats[name] = dict(
          compile_s=time.perf_counter() - t0,
          temp_gib=(memory.temp_size_in_bytes / 2**30) if memory is not None else float("nan"),
          seconds=[],
      )

  for _ in range(args.rounds):
    for name, fn in compiled.items():
      state = fresh()
      state, metrics = fn(state, jbatch)  # warm-up step, not timed
      jax.block_until_ready(metrics["loss"])
      t0 = time.perf_counter()
      for _ in range(args.steps):
        state, metrics = fn(state, jbatch)
      jax.block_until_ready(metrics["loss"])
      stats[name]["seconds"].append((time.perf_counter() - t0) / args.steps)
      stats[name]["logps"] = np.asarray(forward.pair_logps(model, state.params, batch, 128)["chosen_logps_B"])

  base = stats["current"]
  lines = [
      f"### DPO step ablation: shape `{args.shape}`, {args.pairs} pairs, 2 per row ({datetime.date.today()})",
      "",
      f"Command: `python -m benchmarks.step_ablation {' '.join(argv)}`  ",
      f"Machine: {cpu_vs_torch.machine()}; jax {jax.__version__}; packed rows {list(batch['packed_input_ids_BT'].shape)}, "
      f"response slots {list(batch['response_slot_BR'].shape)}, {int((batch['response_side_BR'] > 0).sum())} of them "
      f"real; median of {args.rounds} interleaved rounds of {args.steps} steps.",
      "",
      "| variant | compile | temp memory | s / step | time vs current | max abs. log-prob diff vs current |",
      "|---|---|---|---|---|---|",
  ]
  for name, s in stats.items():
    sec = float(np.median(s["seconds"]))
    diff = float(np.max(np.abs(s["logps"] - base["logps"])))
    lines.append(
        f"| {name} | {s['compile_s']:.1f} s | {s['temp_gib']:.2f} GiB | {sec:.3f} | "
        f"{sec / float(np.median(base['seconds'])):.2f}x | {diff:.1e} |"
    )
  lines.append("")
  tables.emit(lines, args.append)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
