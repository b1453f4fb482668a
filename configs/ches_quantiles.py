"""Section 5: DPO on quantile windows of CHES / -edit distance / last-hidden inner product (Figure 2).

    python launch/run_sweep.py configs/ches_quantiles.py:dataset=ultrafeedback,model=olmo1b   # 45 runs (get_sweep)
    python -m displacement_jax.train --config=configs/ches_quantiles.py:tiny --config.quantiles.measure=all --config.quantiles.q=-1
    python -m displacement_jax.report quantiles runs/quantiles_uf_olmo1b

Arg (configs.common.parse_arg): dataset = ultrafeedback (default; HuggingFaceH4/ultrafeedback_binarized,
train_prefs) | alpacafarm (tatsu-lab/alpaca_farm, preference) | generated (the model's own sampled pairs,
runs/generated_pairs/pairs.jsonl from configs/generate_pairs.py; windows of 64); model = olmo1b (default) |
gemma2b | llama3_8b | smollm2 (the packaged SmolLM2-135M-Instruct: chat template, no added tokens);
tiny = a random tiny Llama on the shipped fixture of the dataset (runs offline in seconds).
`get_sweep()` gives 5 quantiles x 3 measures x 3 seeds.
"""

from __future__ import annotations

import os

import ml_collections

from configs import base, common
from displacement_jax.data import schema
from displacement_jax.experiments import common as experiments_common
from displacement_jax.experiments import quantiles_plan
from displacement_jax.models import packaged

DATA = {  # dataset -> (hub id or file, split, fixture directory in the hub layout, short name of the run directory)
    "ultrafeedback": (schema.ULTRAFEEDBACK_ID, "train_prefs", "ultrafeedback_binarized", "uf"),
    "alpacafarm": (schema.ALPACA_FARM_ID, "preference", "alpaca_farm", "af"),
    # the model's own sampled pairs (configs/generate_pairs.py writes them; its tiny variant for `tiny`)
    "generated": ("runs/generated_pairs/pairs.jsonl", "", "", "gen"),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, dataset="ultrafeedback", model="olmo1b", tiny=False)
  dataset = common.choose("ches_quantiles", "dataset", arg.dataset, DATA)
  model = common.choose("ches_quantiles", "model", arg.model, experiments_common.MODEL_IDS)
  hub_id, split, fixture, short = DATA[dataset]
  config = base.get_base_config()
  config.main = "quantiles"
  config.output_dir = f'runs/quantiles_{short}_{"tiny" if arg.tiny else model}'
  config.quantiles = ml_collections.ConfigDict()
  config.quantiles.measure = "ches"  # one of MEASURES, or 'all' (every measure in one process)
  config.quantiles.q = 0.0  # window centre quantile; -1 = every quantile in one process
  config.quantiles.measures = quantiles_plan.MEASURES  # the measures of measure='all'
  config.quantiles.quantiles = quantiles_plan.QUANTILES  # the quantiles of q=-1
  config.quantiles.window = quantiles_plan.WINDOW  # samples per training subset
  config.quantiles.num_rows = 5000  # random rows scored (0 = all)
  config.quantiles.sample_seed = 0  # seed of that random draw (same for every run of a sweep)
  config.quantiles.seeds = ()  # () = config.seed; else train every seed in one process
  config.quantiles.scores_dir = ""  # '' = parent of output_dir (shared by a sweep)
  config.model.path = experiments_common.MODEL_IDS[model]
  config.data.path, config.data.split = hub_id, split
  instruct = packaged.is_instruct_gguf(config.model.path)  # a GGUF instruct model keeps its template
  config.data.format = "chat_template" if instruct else "prompter_assistant"
  config.data.add_special_tokens = not instruct
  config.data.max_length = 512
  if dataset == "generated":  # 512 pairs: windows of 64 (the paper: 512 of 5000)
    config.quantiles.window = 64
    config.quantiles.num_rows = 0
    config.batch_size = 4  # 16 steps per one-epoch window, as the paper's 512 / 32
  # training: the base defaults are the paper's (DPO, beta 0.1, RMSprop lr 1e-7, batch 32, one epoch)
  config.eval.every = 0  # monitor only at the end: the whole subset
  if arg.tiny:
    config.data.path = (
        "runs/generated_pairs_tiny/pairs.jsonl" if dataset == "generated" else os.path.join(common.FIXTURES, fixture)
    )  # parquet, HF layout
    config.quantiles.window = 4
    config.quantiles.num_rows = 0
    config.batch_size = 2
    common.tiny(config)
  return config


def get_sweep() -> list[dict[str, object]]:
  """Every (measure, quantile, seed) of Figure 2: 45 runs sharing the cached scores."""
  return [
      {"quantiles.measure": m, "quantiles.q": q, "seed": s}
      for m in quantiles_plan.MEASURES
      for q in quantiles_plan.QUANTILES
      for s in quantiles_plan.SEEDS
  ]
