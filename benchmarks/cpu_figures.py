r"""CPU figures beside cpu_vs_torch: the machine's matmul peak, compile times, achieved FLOP/s, bf16 scoring.

  python -m benchmarks.cpu_figures --shape=smollm2-135m --rows=32
  python -m benchmarks.cpu_figures --shape=cpu --rows=64 --append=BENCHMARKS.md

1. Peak: fp32 [n, n] x [n, n] matmul GFLOP/s of XLA:CPU (jax) and of torch on this CPU, once; the larger is the
   machine's peak that every other figure is a fraction of.
2. Compile: seconds to lower + compile the packed DPO train step, the reference/monitor forward and scoring for
   each length bucket the scored rows need, at the shape (random weights).
3. FLOP/s: model FLOPs (benchmarks/flops.py) per second of our DPO step and scoring, as a fraction of the peak.
4. bf16: scoring with bf16 params and compute (float32 sums) against fp32 on the same rows: speed ratio, max
   relative difference and Spearman rank correlation of CHES and LN-CHES.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import torch

from benchmarks import cpu_vs_torch, flops, shapes, tables


def peak_matmul(n: int = 2048, reps: int = 5) -> dict[str, float]:
  """GFLOP/s of an fp32 n x n x n matmul: {'jax': ..., 'torch': ...} (best of `reps`)."""
  rng = np.random.default_rng(0)
  a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
  ja, jb = jnp.asarray(a), jnp.asarray(b)
  f = jax.jit(lambda x, y: x @ y)
  f(ja, jb).block_until_ready()
  ta, tb = torch.from_numpy(a), torch.from_numpy(b)
  out = {}
  for name, call in (("jax", lambda: f(ja, jb).block_until_ready()), ("torch", lambda: ta @ tb)):
    best = float("inf")
    for _ in range(reps):
      t0 = time.perf_counter()
      call()
      best = min(best, time.perf_counter() - t0)
    out[name] = 2 * n**3 / best / 1e9
  return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
  """Spearman rank correlation (Pearson correlation of the ranks; no ties expected in float scores)."""
  ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
  return float(np.corrcoef(ra, rb)[0, 1])


def compile_seconds(jitted: Any, *args: Any) -> float:
  t0 = time.perf_counter()
  jitted.lower(*args).compile()
  return time.perf_counter() - t0


def train_step_parts(model: Any, params: Any, rows: list, lr: float = 1e-6):
  """(jitted packed DPO step, state, batch, tokens): the step `training.run` jits, on `rows`."""
  from displacement_jax import forward  # pylint: disable=g-import-not-at-top
  from displacement_jax.train import optim  # pylint: disable=g-import-not-at-top
  from displacement_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top

  batch = cpu_vs_torch.train_layout(rows, pairs_per_row=2)
  ref = jax.jit(lambda p, b: forward.pair_logps(model, p, b, 128))(params, batch)
  batch = jax.device_put(
      dict(batch, chosen_ref_logps_B=ref["chosen_logps_B"], rejected_ref_logps_B=ref["rejected_logps_B"])
  )
  loss_cfg = ml_collections.ConfigDict(dict(objective="dpo", beta=0.1, sft_coeff=0.0, label_smoothing=0.0))
  optimizer = optim.make_optimizer(ml_collections.ConfigDict(dict(name="rmsprop", lr=lr)), 10)
  step = jax.jit(step_lib.make_train_step(step_lib.make_loss_fn(model, loss_cfg, 128), optimizer, 1), donate_argnums=0)
  state = step_lib.TrainState(
      params=jax.tree.map(jnp.copy, params),
      opt_state=optimizer.init(params),
      step=jnp.zeros((), jnp.int32),
      rng=jax.random.key_data(jax.random.key(0)),
  )
  tokens = sum(len(r[0]) + len(r[1]) + len(r[2]) for r in rows)
  return step, state, batch, tokens


def score_pairs_of(rows: list):
  from displacement_jax.data.tokenize import TokenizedPair  # pylint: disable=g-import-not-at-top

  return [
      TokenizedPair(np.asarray(p, np.int32), np.asarray(c, np.int32), np.asarray(r, np.int32), i)
      for i, (p, c, r) in enumerate(rows)
  ]


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--shape", choices=tuple(shapes.SHAPES), default="smollm2-135m")
  p.add_argument("--rows", type=int, default=32, help="rows scored")
  p.add_argument("--dpo_rows", type=int, default=8)
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--prompt_len", type=int, nargs=2, default=(16, 96))
  p.add_argument("--response_len", type=int, nargs=2, default=(8, 192))
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--append", default=None)
  a = p.parse_args(argv)
  from displacement_jax import forward  # pylint: disable=g-import-not-at-top
  from displacement_jax.score import core as scoring  # pylint: disable=g-import-not-at-top
  from displacement_jax.data import layout  # pylint: disable=g-import-not-at-top
  from displacement_jax.models.transformer import Transformer  # pylint: disable=g-import-not-at-top

  peak = peak_matmul()
  peak_best = max(peak.values())
  config = shapes.model_config(a.shape)
  _, model, params, _ = cpu_vs_torch.build_models(a.shape)
  rows = cpu_vs_torch.random_rows(
      a.rows, config.vocab_size, prompt_len=tuple(a.prompt_len), response_len=tuple(a.response_len)
  )
  fl = shapes.flops_shape(a.shape)

  # Compile times: the train step, the forward the reference pass and the monitor run, scoring per bucket.
  step, state, batch, dpo_tokens = train_step_parts(model, params, rows[: a.dpo_rows])
  c_step = compile_seconds(step, state, batch)
  logps = jax.jit(lambda prm, b: forward.pair_logps(model, prm, b, 128))
  c_logps = compile_seconds(logps, params, batch)
  pairs = score_pairs_of(rows)
  cap = 2 * max(len(r[0]) + max(len(r[1]), len(r[2])) for r in rows)
  buckets = sorted(
      {
          pad
          for _, pad in layout.plan_batches(
              [len(q.prompt_ids) + len(q.chosen_ids) + len(q.rejected_ids) for q in pairs], a.batch_size, cap
          )
      }
  )
  t0 = time.perf_counter()
  fp32 = scoring.score_pairs(model, params, pairs, batch_size=a.batch_size, max_length=cap // 2, progress=False)
  score_first = time.perf_counter() - t0

  # Steady FLOP/s.
  for _ in range(2):
    state, m = step(state, batch)
  jax.block_until_ready(m["loss"])
  t0 = time.perf_counter()
  for _ in range(a.steps):
    state, m = step(state, batch)
  jax.block_until_ready(m["loss"])
  step_s = (time.perf_counter() - t0) / a.steps
  mean_len = dpo_tokens / a.dpo_rows
  step_flops = flops.train_flops_per_token(**fl, seq_len=int(mean_len), lm_head=False) * dpo_tokens
  t0 = time.perf_counter()
  scoring.score_pairs(model, params, pairs, batch_size=a.batch_size, max_length=cap // 2, progress=False)
  score_s = time.perf_counter() - t0
  score_tokens = sum(len(r[0]) + len(r[1]) + len(r[2]) for r in rows)
  score_flops = flops.forward_flops_per_token(**fl, seq_len=int(score_tokens / a.rows), lm_head=False) * score_tokens

  # bf16 scoring against fp32.
  bf_model = Transformer(config.replace(dtype="bfloat16", param_dtype="bfloat16"))
  bf_params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  scoring.score_pairs(bf_model, bf_params, pairs, batch_size=a.batch_size, max_length=cap // 2, progress=False)
  t0 = time.perf_counter()
  bf16 = scoring.score_pairs(bf_model, bf_params, pairs, batch_size=a.batch_size, max_length=cap // 2, progress=False)
  bf_s = time.perf_counter() - t0
  agree = {}
  for key in ("ches", "ln_ches"):
    x, y = np.asarray([r[key] for r in fp32]), np.asarray([r[key] for r in bf16])
    agree[key] = (spearman(x, y), float(np.max(np.abs(y - x) / np.maximum(np.abs(x), 1e-6))))

  today = datetime.date.today().isoformat()
  cmd = "python -m benchmarks.cpu_figures " + " ".join(argv if argv is not None else sys.argv[1:])
  lines = [
      f"### CPU figures, shape `{a.shape}` ({today})",
      "",
      f"Command: `{cmd.strip()}`  ",
      f"Machine: {cpu_vs_torch.machine()}; jax {jax.__version__}, torch {torch.__version__}; random fp32 weights "
      f"(d={config.hidden_size}, layers={config.num_layers}, V={config.vocab_size}).",
      "",
      "| figure | value |",
      "|---|---|",
      f"| fp32 2048^3 matmul peak | XLA:CPU {peak['jax']:.0f} GFLOP/s, torch {peak['torch']:.0f} GFLOP/s |",
      f"| compile: packed DPO train step ({a.dpo_rows} pairs) | {c_step:.1f} s |",
      f"| compile: reference / monitor forward | {c_logps:.1f} s |",
      f"| scoring, first call incl. compile of {len(buckets)} bucket(s) {buckets} | {score_first:.1f} s "
      f"(steady {score_s:.1f} s) |",
      f"| DPO step, {dpo_tokens} tokens | {step_s:.2f} s, {step_flops / step_s / 1e9:.0f} GFLOP/s = "
      f"{step_flops / step_s / 1e9 / peak_best:.0%} of peak |",
      f"| CHES scoring, {a.rows} rows, {score_tokens} tokens | {score_flops / score_s / 1e9:.0f} GFLOP/s = "
      f"{score_flops / score_s / 1e9 / peak_best:.0%} of peak |",
      f"| bf16 scoring vs fp32 | {score_s / bf_s:.2f}x speed; CHES Spearman {agree['ches'][0]:.4f}, max rel. diff "
      f"{agree['ches'][1]:.1e}; LN-CHES Spearman {agree['ln_ches'][0]:.4f}, max rel. diff {agree['ln_ches'][1]:.1e} |",
      "",
  ]
  tables.emit(lines, a.append)
  return dict(peak=peak, compile_step=c_step, compile_logps=c_logps, bf16_speed=score_s / bf_s, agree=agree)


if __name__ == "__main__":
  main()
