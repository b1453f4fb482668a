"""Time the audit decomposition's per-pair gradients on the real model: the whole model's backward against the one
that stops below the subspace (audit/truncated.py), per chunk size (BENCHMARKS.md, "The audit's decomposition").

    python -m benchmarks.decompose_chunk                          # SmolLM2, configs/audit_demo.py's pairs
    python -m benchmarks.decompose_chunk --chunks=2,4 --modes=truncated

One call of decompose.make_chunk_sketches per chunk (compile timed apart), then the median of 3 more chunks.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import audit_demo  # pylint: disable=g-import-not-at-top,wrong-import-position
from displacement_jax import runtime  # pylint: disable=g-import-not-at-top,wrong-import-position
from displacement_jax.audit import decompose, sketch  # pylint: disable=g-import-not-at-top,wrong-import-position
from displacement_jax.data import packing  # pylint: disable=g-import-not-at-top,wrong-import-position
from displacement_jax.experiments import short_runs  # pylint: disable=g-import-not-at-top,wrong-import-position


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config_arg", default="", help="configs/audit_demo.py's arg (e.g. 'tiny')")
  parser.add_argument("--modes", default="truncated,whole", help="truncated | whole, comma-separated")
  parser.add_argument("--chunks", default="2", help="pairs per vectorised call, comma-separated")
  parser.add_argument("--sketch_dim", type=int, default=0, help="audit.sketch_dim (0: the config's)")
  args = parser.parse_args()
  config = audit_demo.get_config(args.config_arg or None)
  config.output_dir = tempfile.mkdtemp(prefix="decompose_chunk_")
  session = short_runs.Session(config)
  dataset = runtime.load_data(config, session.loaded.tokenizer, session.loaded.model_config.vocab_size)
  pairs = dataset.pairs
  shape = packing.packed_lengths(session._host_collate(pairs, dataset.pad_id, len(pairs)))  # pylint: disable=protected-access
  audit = dict(config.audit)
  if args.sketch_dim:
    audit["sketch_dim"] = args.sketch_dim
  subspace = jax.eval_shape(lambda p: sketch.select(p, audit["subspace"], audit["last_layers"]), session.params0)
  bits = sketch.count_sketch_bits(subspace, int(audit["sketch_seed"]))
  for mode in args.modes.split(","):
    for chunk in (int(c) for c in args.chunks.split(",")):
      s = decompose.settings(ml_collections.ConfigDict({"audit": {**audit, "pair_chunk": chunk}}))
      fn = decompose.make_chunk_sketches(session.loaded.model, int(config.logprob_chunk_size), s, mode == "truncated")
      dloss = jnp.zeros((chunk, 2))
      weight = {name: jnp.full(x.shape, 1e-3, jnp.float32) for name, x in subspace.items()}  # a preconditioner's shape
      times = []
      for k in range(4):
        part = [pairs[(k * chunk + i) % len(pairs)] for i in range(chunk)]
        rows = session._collate_rows(part, dataset.pad_id, chunk, shape)  # pylint: disable=protected-access
        tic = time.perf_counter()
        jax.block_until_ready(fn(session.params0, rows, dloss, weight, bits))
        times.append(time.perf_counter() - tic)
      per_chunk = float(np.median(times[1:]))
      print(
          f"{mode} backward, {chunk} pairs per call: first call (compile) {times[0]:.1f} s, then {per_chunk:.2f} s "
          f"per call = {per_chunk / chunk:.2f} s per pair",
          flush=True,
      )


if __name__ == "__main__":
  main()
