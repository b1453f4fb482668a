"""Section 3 persona experiment: SFT, then single-prompt DPO/IPO over 10 seeds (Tables 1-3, 13).

    python -m displacement_jax.train --config=configs/persona.py:model=olmo1b,phase=sft --config.persona.data_path=ends-justify-means.jsonl
    python -m displacement_jax.train --config=configs/persona.py:model=olmo1b,pair=1               # DPO from the SFT model
    python -m displacement_jax.train --config=configs/persona.py:model=olmo1b,objective=ipo,pair=1,phase=base_dpo
    python -m displacement_jax.train --config=configs/persona.py:model=olmo1b,tiny                 # offline, seconds
    python -m displacement_jax.report persona runs/persona_olmo1b

Arg (configs.common.parse_arg): model = olmo1b (default) | gemma2b | llama3_8b | smollm2 (the packaged
SmolLM2-135M-Instruct on the shipped 60 persona rows, phase 'all' by default, offline) | gemma3_270m (the packaged
Gemma-3 270M base model, the same way; its prompts are question + newline: no chat template); phase = sft | dpo (default: from
the SFT export `runs/persona_<model>/sft/hf`, override model.path) | base_dpo (from the base model) | all (SFT then
DPO in one process; the default with tiny); objective = dpo (default) | ipo; pair = index into the model's token
pairs (persona_data.TOKEN_PAIRS; OLMo-1B / Gemma-2B: 0 = Yes/No, 1 = No/Never; Llama-3-8B: 0 = Yes/No,
1 = Sure/Yes); tiny = a random tiny Llama on the shipped fixture (SFT then DPO for two seeds, 5 steps, pair
No/Never: single tokens of the tiny tokenizer).
"""

from __future__ import annotations

import os

import ml_collections

from configs import base, common
from displacement_jax.experiments import common as experiments_common
from displacement_jax.experiments import persona_data
from displacement_jax.models import packaged

PERSONA_DATA = "ends-justify-means.jsonl"  # Anthropic/model-written-evals persona/ends-justify-means.jsonl
SHIPPED_PERSONA = os.path.join(common.ROOT, "displacement_jax", "assets", "persona_demo.jsonl")  # 60 of its rows
OBJECTIVES = ("dpo", "ipo")


def run_name(phase: str, objective: str, pair: int, tiny: bool) -> str:
  """The run directory under runs/persona_<model>/: sft | dpo-1 | base_ipo-0 | all_dpo-0 | tiny[_ipo][_<phase>]."""
  if tiny:
    return "tiny" + ("" if objective == "dpo" else f"_{objective}") + ("" if phase == "all" else f"_{phase}")
  if phase == "sft":
    return "sft"
  return {"dpo": "", "base_dpo": "base_", "all": "all_"}[phase] + f"{objective}-{pair}"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, model="olmo1b", phase="", objective="dpo", pair=0, tiny=False)
  model = common.choose("persona", "model", arg.model, experiments_common.MODEL_IDS)
  # a packaged model runs offline: SFT then DPO in one process, on the shipped 60 rows
  packaged_model = packaged.is_packaged_name(experiments_common.MODEL_IDS[model])
  default_phase = "all" if arg.tiny or packaged_model else "dpo"
  phase = common.choose("persona", "phase", arg.phase or default_phase, persona_data.PHASES)
  objective = common.choose("persona", "objective", arg.objective, OBJECTIVES)
  pairs = persona_data.TOKEN_PAIRS[model]
  if not 0 <= arg.pair < len(pairs):
    raise ValueError(
        f"persona config arg pair={arg.pair} must be < {len(pairs)} (the token pairs of {model}: " f"{pairs})"
    )
  config = base.get_base_config()
  config.main = "persona"
  config.output_dir = f"runs/persona_{model}/{run_name(phase, objective, arg.pair, arg.tiny)}"
  config.persona = ml_collections.ConfigDict()
  config.persona.phase = phase
  config.persona.label = model  # the model's name in result.json and the report tables
  config.persona.data_path = PERSONA_DATA
  config.persona.limit = 0
  config.persona.seeds = persona_data.DPO_SEEDS
  config.persona.preferred, config.persona.dispreferred = pairs[arg.pair]
  config.persona.sft_lr = 1e-7  # used by phase 'all'
  config.persona.sft_batch_size = 32  # used by phase 'all'
  config.persona.fast = True  # all seeds on one loaded model and one compiled step; False: train.loop.run per seed
  config.data.single_token = True
  config.data.format = "persona"  # chat template of the question if the tokenizer has one, else question + '\n'
  config.data.max_length = 128
  config.data.shuffle = False
  config.eval.every = 1  # RMSprop lr 1e-7, beta 0.1: the base defaults
  config.eval.top_k = 10
  config.model.path = experiments_common.MODEL_IDS[model]
  if phase == "sft":
    config.loss.objective = "cross_entropy"
    config.batch_size = 32
    config.num_epochs = 1
    config.eval.every = 0
    config.data.shuffle = True
  else:
    config.loss.objective = objective
    if objective == "ipo":
      config.optim.lr, config.loss.beta = 1e-8, 0.01
    if phase == "dpo":
      config.model.path = f"runs/persona_{model}/sft/hf"
    config.batch_size = 1  # one prompt per seed, full batch
    config.num_steps = 101
  if packaged_model:
    config.persona.data_path = SHIPPED_PERSONA
    config.persona.sft_batch_size = 12  # one epoch of the 60 rows in 5 steps (the paper: 1000 rows, batch 32)
    config.data.format = "persona"
    config.checkpoint.at_end = False  # 20 runs of a 135M model: no 1.6 GB checkpoint each
  if arg.tiny:
    config.persona.data_path = os.path.join(common.FIXTURES, "ends-justify-means.jsonl")
    config.persona.seeds = persona_data.DPO_SEEDS[:2]
    config.persona.sft_lr = 1e-3
    config.persona.sft_batch_size = 4
    config.persona.preferred, config.persona.dispreferred = "No", "Never"
    config.persona.label = f"tiny-llama ({model} recipe)"
    config.num_steps = 5
    config.eval.top_k = 5
    common.tiny(config)
    config.logprob_chunk_size = 16
  return config
