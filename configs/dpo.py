"""DPO on a real model with the paper's hyperparameters (beta 0.1, RMSprop with torch defaults, lr 1e-7).

    python -m displacement_jax.train --config=configs/dpo.py                            # packaged SmolLM2-135M
    python -m displacement_jax.train --config=configs/dpo.py:gemma3-270m                # packaged Gemma-3 270M base
    python -m displacement_jax.train --config=configs/dpo.py:/path/to/hf_dir \
        --config.data.path=my_pairs.jsonl --config.export_hf=True

The arg names the model (HF dir, hub id, .gguf file or packaged name; default 'smollm2-135m-instruct'). Like
configs/score.py, the prompt format follows the tokenizer (data.format='auto'): its chat template when it has one,
else the paper's `<|prompter|>...<|assistant|>` format with the markers added as tokens (printed at start). Batch 32, one epoch, max 512 tokens; the
displacement monitor runs every 10 steps. Without a data.path override the shipped 256 minimal-edit pairs are used
(`displacement_jax/assets/edit_pairs.jsonl`: capitals, chemical symbols and sums, y- = y+ with the answer swapped;
the pairs of configs/edit_search.py:grid=proof): 8 steps.

    python -m displacement_jax.train --config=configs/dpo.py:trl                        # TRL DPOConfig's defaults
    python -m displacement_jax.train --config=configs/dpo.py:/path/to/hf_dir,trl

The `trl` variant takes TRL's defaults instead (docs/sections/trl.md): AdamW lr 1e-6 with a linear decay, gradient
clipping at 1.0, 8 pairs per step, 3 epochs, max_length 1024, TRL's tokenization, the pad embedding frozen as HF's
padding_idx, a row every 10 steps, seed 42. It keeps fp32 compute and no remat: TRL's bf16=True (autocast over fp32
weights) and gradient_checkpointing=True defaults are not taken (--bf16, --gradient_checkpointing set them).
"""

from __future__ import annotations

import os

import ml_collections

from configs import score
from configs import score_tiny

EDIT_PAIRS = os.path.join(score_tiny.ASSETS, "edit_pairs.jsonl")  # experiments.edit_pairs.topic_rows, 3 topics


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  model, variant = arg, ""
  if arg == "trl" or (arg or "").endswith(",trl"):  # 'trl' or 'MODEL,trl'
    model, variant = arg[: -len("trl")].rstrip(",") or None, "trl"
  config = score.get_config(model)
  del config["filter"]
  config.output_dir = "runs/dpo"
  config.data.path = EDIT_PAIRS
  config.data.limit = 0
  config.loss.objective = "dpo"
  config.loss.beta = 0.1
  config.optim.name = "rmsprop"
  config.optim.lr = 1e-7
  config.batch_size = 32
  config.num_epochs = 1
  config.eval.every = 10
  config.checkpoint.every = 100
  return trl_defaults(config) if variant == "trl" else config


def trl_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """TRL DPOConfig's defaults (one device, no accumulation; trl 0.29 to 1.10) on our fields; the table is
  docs/sections/trl.md."""
  config.optim.update(name="adamw", lr=1e-6, schedule="linear", warmup_steps=0, clip=1.0, weight_decay=0.0)
  config.batch_size = 8  # per_device_train_batch_size 8 x 1 device x gradient_accumulation_steps 1
  config.num_epochs = 3
  config.data.max_length = 1024
  config.data.tokenization = "trl"
  config.model.freeze_pad_embedding = True
  config.log_every = 10  # logging_steps
  config.checkpoint.every = 500  # save_steps
  config.seed = 42
  config.output_dir = "runs/dpo_trl"
  return config
