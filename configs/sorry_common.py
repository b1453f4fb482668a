"""Shared builder of the Section 6 SORRY-Bench configs (`sorry_{gemma2b_it,llama3_8b_instruct}.py`).

Arg: the method -- `dpo` (default), `dpo_sft`, `gold`, `filtered` -- or `all` (every method in one process,
sharing the generated and judged pairs), or `tiny` (all methods on a random tiny model, offline).
"""

from __future__ import annotations

import os

import ml_collections

from configs import base
from displacement_jax.experiments import sorry_bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, 'tests', 'fixtures', 'exp')
MODELS = {'gemma2b_it': 'google/gemma-2b-it', 'llama3_8b_instruct': 'meta-llama/Meta-Llama-3-8B-Instruct'}


def make_config(model: str, arg: str | None) -> ml_collections.ConfigDict:
  arg = arg or 'dpo'
  if arg not in sorry_bench.VARIANTS + ('all', 'tiny'):
    raise ValueError(f'sorry config arg must be one of {sorry_bench.VARIANTS + ("all", "tiny")}, got {arg!r}')
  config = base.get_base_config()
  config.main = 'sorry_bench'
  config.output_dir = f'runs/sorry_{model}'
  config.model.path = MODELS[model]
  config.data.path = ''                     # set by the pipeline (its generated preference pairs)
  config.data.format = 'chat_template'
  config.data.max_length = 1024
  config.loss.objective = 'dpo'
  config.loss.beta = 0.1
  config.optim.lr = 5e-6
  config.batch_size = 32
  config.num_epochs = 1
  config.eval.every = 0
  config.sorry = ml_collections.ConfigDict()
  config.sorry.variants = sorry_bench.VARIANTS if arg in ('all', 'tiny') else (arg,)
  config.sorry.prompts_path = sorry_bench.PROMPTS_ID
  config.sorry.human_judgments_path = sorry_bench.HUMAN_JUDGMENT_ID
  config.sorry.num_prompts = 0              # > 0: use only the first N prompts
  config.sorry.sample_temperature = 1.0     # the two responses per prompt that are labelled
  config.sorry.eval_temperature = 0.7       # responses whose refusal rate is reported
  config.sorry.max_new_tokens = 512
  config.sorry.gen_batch_size = 16
  config.sorry.judge_path = sorry_bench.JUDGE_ID
  config.sorry.judge_tiny = ''              # a testing.tiny preset instead of judge_path (tests)
  config.sorry.judge_max_new_tokens = 4
  config.sorry.judge_max_length = 2048
  config.sorry.judge_mode = 'generate'      # 'generate' (greedy text, parsed) | 'logits' ('0' vs '1' logit; tiny)
  config.sorry.tie_breaker = 'pairrm'       # 'pairrm' (needs llm-blender; else random, logged) | 'random'
  config.sorry.test_fraction = 0.15
  config.sorry.split_seed = 0
  config.sorry.sft_coeff = 1.0              # dpo_sft: loss += sft_coeff * (-mean preferred log-prob)
  config.sorry.gold_lr = 1e-6
  config.sorry.filter_k = 19                # filtered: the k pairs with the lowest LN-CHES
  if arg == 'tiny':
    config.output_dir = f'runs/sorry_{model}_tiny'
    config.model.path = ''
    config.model.tiny = 'llama'
    config.sorry.prompts_path = os.path.join(FIXTURES, 'sorry-bench-202406')
    config.sorry.human_judgments_path = os.path.join(FIXTURES, 'sorry-bench-human-judgment-202406')
    config.sorry.judge_path = ''
    config.sorry.judge_tiny = 'llama'
    config.sorry.tie_breaker = 'random'
    config.sorry.max_new_tokens = 6
    config.sorry.judge_max_new_tokens = 2
    config.sorry.judge_max_length = 256
    config.sorry.judge_mode = 'logits'      # a random tiny judge rarely writes a parsable score
    config.sorry.gen_batch_size = 8
    config.sorry.filter_k = 2
    config.sorry.gold_lr = 1e-3
    config.data.format = 'raw'
    config.data.max_length = 64
    config.optim.lr = 1e-3
    config.batch_size = 2
    config.num_epochs = 0
    config.num_steps = 2
    config.logprob_chunk_size = 32
    config.progress = False
    config.checkpoint.async_save = False
  return config
