"""The displacement audit with its decomposition on the demo's run (configs/demo.py): who pushes whom.

    python -m displacement_jax.audit --config=configs/audit_demo.py                    # SmolLM2-135M-Instruct
    python -m displacement_jax.audit --config=configs/audit_demo.py:tiny               # a tiny random Llama

The demo's 40 minimal-edit pairs (displacement_jax/assets/edit_pairs_40.jsonl: `edit_pairs.rows("edit", limit=40)`,
checked by tests/test_audit.py), DPO beta 0.1, RMSprop (torch defaults) lr 1e-6, batch 8, one epoch. The
decomposition projects per-pair gradients by a count-sketch of k = 16384 on the LM head (the tied embedding), the
final norm and the last 2 decoder layers: 35,392,320 of SmolLM2's 134,515,008 parameters. Not on all of them here:
that would hold the 5 steps' preconditioners (5 x 0.54 GB float32) on the host and per pair of a chunk its two
gradients and three weighted / stacked copies (5 x 0.54 GB), while this run already peaks near the ~6 GiB this
machine allows (docs/results.md section 0). k = 16384, not 4096: the head's count-sketch hashes rows and columns
(audit/sketch.py), noisier per k on these gradients (own + others against the exact subspace first order:
correlation 0.54-0.73 at 4096, 0.75-0.86 at 8192, 0.88-0.95 at 16384, two seeds each; BENCHMARKS.md). One pair
per vectorised call (faster than 2 on this 2-core machine).
"""

from __future__ import annotations

import os

import ml_collections

from configs import common
from configs import demo

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "displacement_jax", "assets")
PAIRS = os.path.join(ASSETS, "edit_pairs_40.jsonl")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, model=demo.DEFAULT_MODEL, tiny=False)
  config = demo.get_config(f"model={arg.model}" + (",tiny" if arg.tiny else ""))
  config.main = ""
  config.output_dir = "runs/audit_demo" + ("_tiny" if arg.tiny else "")
  config.data.path = PAIRS
  config.data.schema = "generic"
  config.num_steps = 0
  config.optim.lr = float(config.demo.dpo.optim.lr)
  config.audit.subspace = "head_and_last_layers"
  config.audit.last_layers = 2
  config.audit.sketch = "count_sketch"
  config.audit.sketch_dim = 16384
  config.audit.pair_chunk = 1
  del config.demo
  return config
