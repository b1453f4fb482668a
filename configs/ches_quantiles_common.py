"""Shared builder of the Section 5 configs (CHES quantile windows): `ches_quantiles_{ultrafeedback,alpacafarm}.py`.

The arg picks the model: 'olmo1b' (default), 'gemma2b', 'llama3_8b', or 'tiny' (random tiny Llama on the
shipped fixture, runs offline in seconds). `get_sweep()` gives 5 quantiles x 3 measures x 3 seeds.
"""

from __future__ import annotations

import os

import ml_collections

from configs import base

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_DATA = {
    'ultrafeedback': os.path.join(ROOT, 'tests', 'fixtures', 'exp', 'ultrafeedback_binarized'),  # parquet, HF layout
    'alpacafarm': os.path.join(ROOT, 'tests', 'fixtures', 'exp', 'alpaca_farm'),
}
DATA = {
    'ultrafeedback': ('HuggingFaceH4/ultrafeedback_binarized', 'train_prefs'),
    'alpacafarm': ('tatsu-lab/alpaca_farm', 'preference'),
}
SHORT = {'ultrafeedback': 'uf', 'alpacafarm': 'af'}
MODELS = {'olmo1b': 'allenai/OLMo-1B-hf', 'gemma2b': 'google/gemma-2b', 'llama3_8b': 'meta-llama/Meta-Llama-3-8B'}
MEASURES = ('ches', 'minus_normalized_edit_distance', 'last_hidden_inner_product')
QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)
SEEDS = (0, 1, 2)


def make_config(dataset: str, arg: str | None) -> ml_collections.ConfigDict:
  arg = arg or 'olmo1b'
  if arg != 'tiny' and arg not in MODELS:
    raise ValueError(f'config arg must be one of {sorted(MODELS)} or "tiny", got {arg!r}')
  config = base.get_base_config()
  config.main = 'quantiles'
  config.output_dir = f'runs/quantiles_{SHORT[dataset]}_{arg}'
  config.quantiles = ml_collections.ConfigDict()
  config.quantiles.measure = 'ches'       # one of MEASURES, or 'all' (every measure in one process)
  config.quantiles.q = 0.0                # window centre quantile; -1 = every quantile in one process
  config.quantiles.measures = MEASURES    # the measures of measure='all'
  config.quantiles.quantiles = QUANTILES  # the quantiles of q=-1
  config.quantiles.window = 512           # samples per training subset
  config.quantiles.num_rows = 5000        # random rows scored (0 = all)
  config.quantiles.sample_seed = 0        # seed of that random draw (same for every run of a sweep)
  config.quantiles.seeds = ()             # () = config.seed; else train every seed in one process
  config.quantiles.scores_dir = ''        # '' = parent of output_dir (shared by a sweep)
  config.data.path, config.data.split = DATA[dataset]
  config.data.format = 'prompter_assistant'
  config.data.add_special_tokens = True
  config.data.max_length = 512
  config.loss.objective = 'dpo'
  config.loss.beta = 0.1
  config.optim.lr = 1e-7
  config.batch_size = 32
  config.num_epochs = 1
  config.eval.every = 0                   # monitor only at the end: the whole subset
  if arg == 'tiny':
    config.model.tiny = 'llama'
    config.data.path = TINY_DATA[dataset]
    config.data.max_length = 64
    config.quantiles.window = 4
    config.quantiles.num_rows = 0
    config.batch_size = 2
    config.optim.lr = 1e-3
    config.logprob_chunk_size = 32
    config.progress = False
    config.checkpoint.async_save = False
  else:
    config.model.path = MODELS[arg]
  return config


def get_sweep() -> list[dict[str, object]]:
  return [{'quantiles.measure': m, 'quantiles.q': q, 'seed': s} for m in MEASURES for q in QUANTILES for s in SEEDS]
