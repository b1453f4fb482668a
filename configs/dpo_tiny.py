"""A tiny offline DPO run (seconds on CPU): random tiny Llama + the shipped preference jsonl fixture.

    python -m displacement_jax.train --config=configs/dpo_tiny.py
    python -m displacement_jax.train --config=configs/dpo_tiny.py:ipo --config.num_steps=20

The optional arg picks the objective (default 'dpo'). The learning rate is far above the paper's 1e-7
so that a random tiny model visibly learns within a few steps.
"""

from __future__ import annotations

import os

from configs import base

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "displacement_jax", "assets")


def get_config(arg: str | None = None):
  config = base.get_base_config()
  config.output_dir = "runs/dpo_tiny"
  config.model.tiny = "llama"
  config.model.seed = 0
  config.data.path = os.path.join(ASSETS, "tiny_preferences.jsonl")
  config.data.format = "prompter_assistant"
  config.data.max_length = 64
  config.loss.objective = arg or "dpo"
  config.loss.beta = 0.1
  config.optim.name = "rmsprop"
  config.optim.lr = 1e-3
  config.batch_size = 8
  config.num_steps = 10
  config.eval.every = 5
  config.eval.max_samples = 16
  config.checkpoint.every = 5
  config.checkpoint.keep = 2
  config.logprob_chunk_size = 32
  return config
