"""The README's first command: `python -m displacement_jax.train --config=configs/demo.py` (offline, CPU, < 3 min).

Likelihood displacement on a real model, predicted before training, then prevented (displacement_jax/experiments/demo.py):
40 minimal-edit factual pairs the project writes (`experiments.edit_pairs`, kind 'edit'), the packaged
SmolLM2-135M-Instruct with its chat template, DPO beta 0.1 with RMSprop (the paper's optimizer, torch defaults)
at lr 1e-6, batch 8, one epoch (5 steps). Where the effect lives was found by configs/edit_search.py
(docs/results.md): the paper's lr 1e-7 barely moves these pairs; 1e-6 is TRL's default learning rate.

    python -m displacement_jax.train --config=configs/demo.py                       # SmolLM2-135M-Instruct
    python -m displacement_jax.train --config=configs/demo.py:model=/path/to/hf_dir
    python -m displacement_jax.train --config=configs/demo.py:model=gemma3-270m     # Gemma-3 270M base (packaged)
    python -m displacement_jax.train --config=configs/demo.py:tiny                  # a tiny random Llama (tests)
"""

from __future__ import annotations

import ml_collections

from configs import base
from configs import common

DEFAULT_MODEL = "smollm2-135m-instruct"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, model=DEFAULT_MODEL, tiny=False)
  config = base.get_base_config()
  config.main = "demo"
  config.output_dir = "runs/demo_tiny" if arg.tiny else "runs/demo"
  config.seed = 0
  config.progress = False
  config.model.path = arg.model
  # the default model's chat template; another model's format follows its tokenizer (a base model such as
  # model=gemma3-270m: the paper's <|prompter|>...<|assistant|>, its markers added as tokens)
  config.data.format = "chat_template" if arg.model == DEFAULT_MODEL else "auto"
  config.data.max_length = 64
  config.logprob_chunk_size = 64
  config.batch_size = 8
  config.num_epochs = 1
  config.loss.objective = "dpo"
  config.loss.beta = 0.1
  config.optim.name = "rmsprop"  # torch RMSprop defaults, as in the paper

  config.demo = ml_collections.ConfigDict()
  config.demo.num_pairs = 40  # the first countries of edit_pairs.CAPITALS (5 steps at batch 8: < 3 min in all)
  config.demo.example_pair = 0  # the pair whose per-token probabilities are shown (France)
  config.demo.dpo = {"optim": {"lr": 1e-6}}  # the DPO run: overrides of this config
  # each remedy: the DPO run with these overrides (DPO + SFT term: 0.1 x mean summed -ln pi(y+); DPOP lambda 50)
  config.demo.remedies = {"dpo+sft": {"loss": {"sft_coeff": 0.1}}, "dpop": {"loss": {"objective": "dpop"}}}
  if arg.tiny:
    config.model.path = ""
    config.model.tiny = "llama"
    config.demo.num_pairs = 16
    config.demo.dpo.optim.lr = 1e-3
  return config
