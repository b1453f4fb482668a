"""DPO on a real model with the paper's hyperparameters (beta 0.1, RMSprop with torch defaults, lr 1e-7).

    python -m displacement_jax.train --config=configs/dpo.py                            # packaged SmolLM2-135M
    python -m displacement_jax.train --config=configs/dpo.py:/path/to/hf_dir \
        --config.data.path=my_pairs.jsonl --config.export_hf=True

The arg names the model (HF dir, hub id, .gguf file or packaged name; default 'smollm2-135m-instruct'). Like
configs/score.py, the prompt format follows the tokenizer (data.format='auto'): its chat template when it has one,
else the paper's `<|prompter|>...<|assistant|>` format with the markers added as tokens (printed at start). Batch 32, one epoch, max 512 tokens; the
displacement monitor runs every 10 steps. Without a data.path override the shipped 24-row jsonl is used.
"""

from __future__ import annotations

import ml_collections

from configs import score


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = score.get_config(arg)
  del config["filter"]
  config.output_dir = "runs/dpo"
  config.data.limit = 0
  config.loss.objective = "dpo"
  config.loss.beta = 0.1
  config.optim.name = "rmsprop"
  config.optim.lr = 1e-7
  config.batch_size = 32
  config.num_epochs = 1
  config.eval.every = 10
  config.checkpoint.every = 100
  return config
