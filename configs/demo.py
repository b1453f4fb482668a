"""The README's first command: `python -m displacement_jax.train --config=configs/demo.py` (offline, CPU, < 3 min).

A tiny random Llama (testing.tiny preset) is fine-tuned with cross-entropy on the shipped persona sample
(single-token responses), then trained with DPO on ONE prompt for a pair of persona tokens picked by the
theory (most negative Theorem 1 rate); see displacement_jax/demo.py.

Learning rates are far above the paper's 1e-7: the tiny model is random and the demo has seconds, not hours.
SFT at 3e-3 for 60 steps makes the model confident in the persona answers (the regime of Table 1, where
pi(y+) starts high); DPO at 1e-4 (RMSprop, beta 0.1) for 100 steps moves it visibly.
"""

from __future__ import annotations

import os

import ml_collections

from configs import base

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "displacement_jax", "assets")
PERSONA_TOKENS = ("Yes", "No", "Never", "Maybe", "Perhaps", "Yeah", "Sure", "Certainly", "Absolutely")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = base.get_base_config()
  config.main = "demo"
  config.output_dir = "runs/demo"
  config.seed = 0
  config.model.tiny = "llama"
  config.model.seed = 0
  config.data.path = os.path.join(ASSETS, "persona_demo.jsonl")
  config.data.format = "persona"  # chat template of the question (the tiny tokenizer has one)
  config.data.single_token = True
  config.data.max_length = 64
  config.optim.name = "rmsprop"  # torch RMSprop defaults, as in the paper
  config.logprob_chunk_size = 64
  config.eval.max_samples = 32

  config.sft = ml_collections.ConfigDict()
  config.sft.lr = 3e-3  # SFT phase learning rate (RMSprop)
  config.sft.batch_size = 32
  config.sft.num_steps = 60  # > 0 wins over num_epochs
  config.sft.num_epochs = 0

  config.dpo = ml_collections.ConfigDict()
  config.dpo.objective = "dpo"
  config.dpo.beta = 0.1
  config.dpo.lr = 1e-4  # DPO phase learning rate (RMSprop)
  config.dpo.num_steps = 100
  config.dpo.prompt_index = 0  # the one training prompt (row of data.path)
  config.dpo.top_k = 5  # gainers reported / plotted
  config.dpo.candidate_tokens = PERSONA_TOKENS
  return config
