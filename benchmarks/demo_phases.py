"""The pieces of the README demo on the packaged SmolLM2 (configs/demo.py), each timed twice (compile, then run).

    python -m benchmarks.demo_phases                 # 40 pairs, as the demo
    python -m benchmarks.demo_phases --pairs=48

Times: the model load, the per-pair log-prob pass (packed rows), CHES scoring, the audit's JVP pass (a zero
direction: the cost, not the value), the whole audit of the demo's DPO run, and one train step at the demo's
packed shape (compile and steady state).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import demo as demo_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from displacement_jax import sharding  # pylint: disable=g-import-not-at-top
from displacement_jax.train import monitor as evaluation  # pylint: disable=g-import-not-at-top
from displacement_jax.score import core as scoring  # pylint: disable=g-import-not-at-top
from displacement_jax.train import fns as fns_lib  # pylint: disable=g-import-not-at-top
from displacement_jax.train import loop as training  # pylint: disable=g-import-not-at-top
from displacement_jax.data import schema  # pylint: disable=g-import-not-at-top
from displacement_jax.experiments import edit_pairs, short_runs  # pylint: disable=g-import-not-at-top


def timed(name: str, fn, repeat: int = 2) -> None:
  for i in range(repeat):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    print(f"{name} ({'first, with compile' if i == 0 else 'again'}): {time.perf_counter() - t:.1f} s", flush=True)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--pairs", type=int, default=40)
  args = parser.parse_args()
  config = demo_config.get_config()
  config.output_dir = tempfile.mkdtemp()
  t = time.perf_counter()
  session = short_runs.Session(config)
  dataset = session.dataset(edit_pairs.rows("edit", limit=args.pairs), "edit")
  print(f"load model and pairs: {time.perf_counter() - t:.1f} s", flush=True)
  timed("per-pair log-probs (packed)", lambda: session.logps(session.params0, dataset))
  examples = list(schema.load_preference_data(dataset.path))
  timed(
      "CHES scoring",
      lambda: scoring.score_examples(
          session.loaded.model,
          session.params0,
          config,
          session.loaded.tokenizer,
          examples,
          batch_size=8,
          progress=False,
      )
      and 0,
  )
  zero = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), session.params0)
  timed("audit JVP pass", lambda: session.first_order(zero, dataset))
  timed("whole audit (replay, JVP, forwards)", lambda: session.audit(dataset, {"optim.lr": 1e-6})["first_order"], 1)
  mesh, iterator = session.mesh, training.make_iterator(dataset, config, session.mesh)
  fns = fns_lib.make_fns(session.loaded, config, mesh, 6)
  state = fns.init_state(jax.tree.map(jnp.copy, session.params0))
  local = next(iterator)
  ref = {"chosen_ref_logps": np.zeros(len(dataset.pairs)), "rejected_ref_logps": np.zeros(len(dataset.pairs))}
  batch = sharding.host_local_batch_to_global(
      evaluation.add_reference(local, training.positions(local, dataset), ref), mesh
  )
  print(f"train step shape (rows, slots, response slots): {iterator.packed_shapes(0)}")
  t = time.perf_counter()
  step = fns.train_step.lower(state, batch).compile()
  print(f"train step compile: {time.perf_counter() - t:.1f} s", flush=True)
  for _ in range(3):
    t = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    print(f"train step: {time.perf_counter() - t:.2f} s", flush=True)


if __name__ == "__main__":
  main()
