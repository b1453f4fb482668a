"""Model-generated preference pairs (two sampled responses per prompt) for the Figure-2-style run.

    python -m displacement_jax.train --config=configs/generate_pairs.py          # SmolLM2-135M-Instruct, 512 prompts
    python -m displacement_jax.train --config=configs/generate_pairs.py:tiny     # a tiny random Llama, 8 prompts
    python -m displacement_jax.train --config=configs/ches_quantiles.py:dataset=generated,model=smollm2 \
        --config.quantiles.measure=all --config.quantiles.q=-1                    # then Figure 2 on them

See displacement_jax/experiments/generated_pairs.py. The prompts are the project's own (16 task templates x 32
topics); responses are sampled at T=1 (the paper's Section 6 temperature) with the model's chat template.
"""

from __future__ import annotations

import ml_collections

from configs import base, common, demo


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, model=demo.DEFAULT_MODEL, tiny=False)
  config = base.get_base_config()
  config.main = "generate_pairs"
  config.output_dir = "runs/generated_pairs_tiny" if arg.tiny else "runs/generated_pairs"
  config.model.path = arg.model
  config.data.path = "(generated)"  # not read: the prompts are experiments.generated_pairs.PROMPTS
  config.data.format = "chat_template"
  config.data.max_length = 256  # prompt + new tokens
  config.pairs = ml_collections.ConfigDict()
  config.pairs.num_prompts = 0  # 0 = all of PROMPTS (512)
  config.pairs.temperature = 1.0
  config.pairs.max_new_tokens = 64
  config.pairs.batch_size = 64  # prompts per generate call
  config.pairs.max_tries = 3  # draws of a pair whose responses came out equal or empty
  if arg.tiny:
    common.tiny(config)
    config.data.format = "chat_template"  # the tiny tokenizer has a chat template too
    config.pairs.num_prompts = 8
    config.pairs.max_new_tokens = 8
    config.pairs.batch_size = 4
  return config
