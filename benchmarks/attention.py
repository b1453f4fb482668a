r"""One attention layer on the DPO step's packed rows: block-causal ('blocked', the default) vs the full square.

  python -m benchmarks.attention --shape=smollm2-135m --pairs=8 --append=BENCHMARKS.md

The packed layout `train.loop.run` steps on (benchmarks.cpu_vs_torch.train_layout: the same random rows, up to
`--pairs_per_row` pairs per row, segment + branch + causal mask), the shape's heads and head size, random q/k/v
(float32): best-of-5 wall time of the jitted forward and of forward + backward (gradients of q, k and v) and the
compile time of forward + backward for each `ModelConfig.attention_impl` ('blocked' at every `--blocks` query
block size; the model compiles one attention per layer body, so these compile times add to the step's), and
the largest difference from 'reference' (the full [T, T] einsum).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import cpu_vs_torch, shapes, tables
from displacement_jax.models import transformer

IMPLS = ("reference", "xla", "blocked")


def best_seconds(fn, *args, reps: int = 5) -> float:
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
  parser.add_argument("--shape", default="smollm2-135m", choices=sorted(shapes.SHAPES))
  parser.add_argument("--pairs", type=int, default=8)
  parser.add_argument("--pairs_per_row", type=int, default=2)
  parser.add_argument(
      "--blocks", default=str(transformer.QUERY_BLOCK), help="query block sizes of 'blocked', e.g. 64,128"
  )
  parser.add_argument("--append", default="")
  args = parser.parse_args(argv)
  hf = shapes.SHAPES[args.shape]
  n, kv = hf["num_attention_heads"], hf.get("num_key_value_heads", hf["num_attention_heads"])
  h = hf["hidden_size"] // n
  rows = cpu_vs_torch.random_rows(
      args.pairs, hf["vocab_size"], prompt_len=(16, 96), response_len=(8, 192)
  )  # cpu_vs_torch's row lengths
  b = cpu_vs_torch.train_layout(rows, args.pairs_per_row)
  branch = jnp.asarray(b["packed_branch_BT"])
  mask = transformer.branch_attention_mask_BTS(
      branch >= 0, branch, jnp.asarray(b["packed_positions_BT"]), None, jnp.asarray(b["packed_segment_BT"])
  )
  bsz, t = branch.shape
  rng = np.random.default_rng(0)
  q, k, v, g = (jnp.asarray(rng.standard_normal((bsz, t, m, h), dtype=np.float32)) for m in (n, kv, kv, n))
  lines = [
      f"### Attention layer: shape `{args.shape}`, {args.pairs} pairs, {args.pairs_per_row} per row "
      f"({datetime.date.today()})",
      "",
      f"Command: `python -m benchmarks.attention --shape={args.shape} --pairs={args.pairs} "
      f"--pairs_per_row={args.pairs_per_row} --blocks={args.blocks}`  ",
      f"Packed rows [{bsz}, {t}], {n} query / {kv} key-value heads of {h}; float32; best of 5.",
      "",
      "| attention_impl | forward | forward + backward | compile forward + backward | max abs. diff vs reference (out / grads) |",
      "|---|---|---|---|---|",
  ]
  variants = {impl: functools.partial(transformer.attention, impl=impl) for impl in IMPLS if impl != "blocked"}
  for block in (int(x) for x in args.blocks.split(",")):
    variants[f"blocked ({block} queries)"] = functools.partial(transformer.causal_block_attention, block=block)
  outs = {}
  for impl, attend in variants.items():
    fwd = jax.jit(lambda q, k, v, attend=attend: attend(q, k, v, mask, h**-0.5))
    grad = jax.jit(jax.grad(lambda q, k, v, attend=attend: jnp.sum(attend(q, k, v, mask, h**-0.5) * g), (0, 1, 2)))
    start = time.perf_counter()
    grad.lower(q, k, v).compile()
    compile_s = time.perf_counter() - start
    outs[impl] = (fwd(q, k, v), grad(q, k, v))
    ref_out, ref_grads = outs["reference"]
    diff_out = float(jnp.max(jnp.abs(outs[impl][0] - ref_out)))
    diff_grad = max(float(jnp.max(jnp.abs(a - r))) for a, r in zip(outs[impl][1], ref_grads))
    lines.append(
        f"| {impl} | {1e3 * best_seconds(fwd, q, k, v):.1f} ms | {1e3 * best_seconds(grad, q, k, v):.1f} ms | "
        f"{compile_s:.2f} s | {diff_out:.1e} / {diff_grad:.1e} |"
    )
  tables.emit(lines, args.append)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
