"""Score a preference dataset by CHES / LN-CHES with a real model: the paper's Section 5 protocol.

    python -m displacement_jax.score --config=configs/score.py                          # packaged SmolLM2-135M
    python -m displacement_jax.score --config=configs/score.py:gemma3-270m              # packaged Gemma-3 270M base
    python -m displacement_jax.score --config=configs/score.py:/path/to/hf_dir \
        --config.data.path=HuggingFaceH4/ultrafeedback_binarized --config.data.split=train_prefs

The arg names the model: an HF dir, a hub id (offline: must be in the HF cache), a .gguf file or a packaged
name (default 'smollm2-135m-instruct', see models.load). Defaults are Section 5's: 5000 random rows (when the
dataset has more), max 512 tokens, response + EOS. The prompt format follows the tokenizer (data.format='auto'):
its chat template when it has one, else the paper's base-model format `<|prompter|>{prompt}<|assistant|>` with
those markers added as new tokens; so one model scores the same whichever way it is named (packaged name, .gguf
file, HF dir). The choice and any vocabulary change are printed in one line at start and recorded (summary.json
`format`, `vocabulary`). Without a data.path override the shipped 24-row jsonl is scored (offline).
"""

from __future__ import annotations

import os

import ml_collections

from configs import base, score_tiny

DEFAULT_MODEL = "smollm2-135m-instruct"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  model = arg or DEFAULT_MODEL
  config = base.get_base_config()
  config.output_dir = "runs/score"
  config.model.path = model
  config.data.path = os.path.join(score_tiny.ASSETS, "tiny_preferences.jsonl")
  config.data.schema = "auto"
  config.data.seed = 0
  config.data.limit = 5000  # Section 5: 5000 random rows (all rows when there are fewer)
  config.data.max_length = 512
  config.data.truncation = "truncate_response"
  config.data.format = "auto"  # the tokenizer's chat template, else <|prompter|>...<|assistant|> (tokens added)
  config.batch_size = 8
  config.filter = score_tiny.get_filter_config()
  return config
