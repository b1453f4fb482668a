"""Shared builder of the Section 3 persona configs (`persona_{olmo1b,gemma2b,llama3_8b}.py`).

Arg grammar: `sft` | `<objective>-<pair>` | `base_<objective>-<pair>` | `tiny`, where objective is dpo or
ipo and pair indexes the model's token pairs (persona.TOKEN_PAIRS; e.g. OLMo-1B: 0 = Yes/No, 1 = No/Never).
`dpo-<pair>` starts from the SFT export (`runs/persona_<model>/sft/hf`, override model.path);
`base_dpo-<pair>` starts from the base model. `tiny` runs SFT then DPO on a random tiny model offline.
"""

from __future__ import annotations

import os

import ml_collections

from configs import base
from displacement_jax.experiments import persona

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PERSONA_DATA = 'ends-justify-means.jsonl'  # Anthropic/model-written-evals persona/ends-justify-means.jsonl
TINY_DATA = os.path.join(ROOT, 'tests', 'fixtures', 'exp', 'ends-justify-means.jsonl')


def make_config(model: str, arg: str | None) -> ml_collections.ConfigDict:
  arg = arg or 'dpo-0'
  config = base.get_base_config()
  config.main = 'persona'
  config.output_dir = f'runs/persona_{model}/{arg}'
  config.persona = ml_collections.ConfigDict()
  config.persona.phase = 'dpo'
  config.persona.label = model         # the model's name in result.json and the report tables
  config.persona.data_path = PERSONA_DATA
  config.persona.limit = 0
  config.persona.seeds = persona.DPO_SEEDS
  config.persona.preferred, config.persona.dispreferred = persona.TOKEN_PAIRS[model][0]
  config.persona.sft_lr = 1e-7         # used by phase 'all'
  config.persona.sft_batch_size = 32   # used by phase 'all'
  config.data.single_token = True
  config.data.format = 'persona'       # chat template of the question if the tokenizer has one, else question + '\n'
  config.data.max_length = 128
  config.data.shuffle = False
  config.loss.objective = 'dpo'
  config.loss.beta = 0.1
  config.optim.lr = 1e-7
  config.eval.every = 1
  config.eval.top_k = 10
  config.model.path = persona.MODEL_IDS[model]
  if arg == 'sft':
    config.persona.phase = 'sft'
    config.loss.objective = 'cross_entropy'
    config.batch_size = 32
    config.num_epochs = 1
    config.eval.every = 0
    config.data.shuffle = True
    return config
  if arg == 'tiny':
    config.persona.phase = 'all'
    config.persona.data_path = TINY_DATA
    config.persona.seeds = persona.DPO_SEEDS[:2]
    config.persona.sft_lr = 1e-3
    config.persona.sft_batch_size = 4
    config.persona.preferred, config.persona.dispreferred = 'No', 'Never'
    config.model.path = ''
    config.model.tiny = 'llama'
    config.persona.label = f'tiny-llama ({model} recipe)'
    config.data.max_length = 64
    config.num_steps = 5
    config.optim.lr = 1e-3
    config.eval.top_k = 5
    config.logprob_chunk_size = 16
    config.progress = False
    config.checkpoint.async_save = False
    return config
  phase, _, pair = arg.partition('-')
  objective = phase.replace('base_', '')
  if objective not in ('dpo', 'ipo') or not pair.isdigit() or int(pair) >= len(persona.TOKEN_PAIRS[model]):
    raise ValueError(f'persona config arg must be sft | tiny | [base_](dpo|ipo)-<pair index < '
                     f'{len(persona.TOKEN_PAIRS[model])}>, got {arg!r}')
  config.persona.phase = 'base_dpo' if phase.startswith('base_') else 'dpo'
  config.persona.preferred, config.persona.dispreferred = persona.TOKEN_PAIRS[model][int(pair)]
  config.loss.objective = objective
  if objective == 'ipo':
    config.optim.lr, config.loss.beta = 1e-8, 0.01
  if config.persona.phase == 'dpo':
    config.model.path = f'runs/persona_{model}/sft/hf'
  config.batch_size = 1
  config.num_steps = 101
  return config
