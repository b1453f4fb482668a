r"""Model-generated preference pairs for the Figure-2-style run on a model without a dataset download.

    python -m displacement_jax.train --config=configs/generate_pairs.py        # SmolLM2-135M-Instruct, 256 prompts
    python -m displacement_jax.train --config=configs/generate_pairs.py:tiny   # a tiny random Llama, seconds

`PROMPTS` are written here: every task template applied to every topic (16 x 32 = 512 varied requests). Each
prompt gets `pairs.samples` responses sampled from the model at `pairs.temperature` with its chat template
(`experiments.sorry_bench.generation.make_generator`, the KV-cache sampler; `generation.sample_pairs`); consecutive samples form the pairs
(chosen = the first, rejected = the second: the labels carry no meaning, CHES predicts the change of the preferred
log-prob whichever response is preferred). A pair whose two responses are equal or empty is drawn again with the
next seed, up to `pairs.max_tries` times, then left out and counted. Writes output_dir/pairs.jsonl (generic
preference rows with `index`) and output_dir/summary.json.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections
import numpy as np

from displacement_jax import rundir, runtime
from displacement_jax.data import schema
from displacement_jax.experiments.sorry_bench import generation

PAIRS_FILE, SUMMARY_FILE = "pairs.jsonl", "summary.json"

TASKS = (
    "Explain {} to a ten-year-old.",
    "Give three surprising facts about {}.",
    "Write a short poem about {}.",
    "What are the main advantages and disadvantages of {}?",
    "Summarize the history of {} in two sentences.",
    "Write a one-paragraph story that involves {}.",
    "What is a common misconception about {}?",
    "Suggest a weekend project related to {}.",
    "How would you describe {} to someone from the year 1800?",
    "Write a tweet promoting {}.",
    "List the steps a beginner should take to learn about {}.",
    "What questions would a scientist ask about {}?",
    "Compare {} with something from everyday life.",
    "Give a short, balanced opinion on {}.",
    "Write a haiku about {}.",
    "What could go wrong with {}, and how can it be avoided?",
)
TOPICS = (
    "volcanoes",
    "learning a second language",
    "electric cars",
    "the history of coffee",
    "honeybees",
    "remote work",
    "black holes",
    "chess",
    "baking bread",
    "the Roman Empire",
    "recycling plastic",
    "machine learning",
    "marathon running",
    "the Moon landing",
    "houseplants",
    "public libraries",
    "earthquakes",
    "jazz music",
    "the printing press",
    "sleep",
    "solar panels",
    "origami",
    "octopuses",
    "city cycling",
    "board games",
    "the water cycle",
    "vaccines",
    "mountain hiking",
    "chocolate",
    "space telescopes",
    "composting",
    "photography",
)
PROMPTS = tuple(task.format(topic) for task in TASKS for topic in TOPICS)


def _log(msg: str) -> None:
  print(msg, flush=True)


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Sample the pairs and write output_dir/pairs.jsonl; returns the summary (also output_dir/summary.json)."""
  pc = config.pairs
  prompts = list(PROMPTS[: int(pc.num_prompts)] if int(pc.num_prompts) else PROMPTS)
  os.makedirs(config.output_dir, exist_ok=True)
  loaded = runtime.load_model(config)
  generator = generation.make_generator(
      loaded.model,
      loaded.params,
      loaded.tokenizer,
      data_format=config.data.format,
      batch_size=int(pc.batch_size),
      max_length=int(config.data.max_length),
      progress=bool(config.get("progress", True)),
  )
  _log(
      f"[pairs] sampling 2 responses for each of {len(prompts)} prompts (T={pc.temperature:g}, up to "
      f"{pc.max_new_tokens} new tokens) from {config.model.get('path') or config.model.get('tiny')}"
  )
  pairs, left_out = generation.sample_pairs(
      generator,
      prompts,
      temperature=float(pc.temperature),
      max_new_tokens=int(pc.max_new_tokens),
      seed=int(config.seed),
      max_tries=int(pc.max_tries),
  )
  path = schema.write_jsonl(os.path.join(config.output_dir, PAIRS_FILE), pairs)
  lengths = [len(loaded.tokenizer(p[side])["input_ids"]) for p in pairs for side in ("chosen", "rejected")]
  summary = {
      "model": str(config.model.get("path") or config.model.get("tiny")),
      "prompts": len(prompts),
      "pairs": len(pairs),
      "left_out": left_out,
      "temperature": float(pc.temperature),
      "max_new_tokens": int(pc.max_new_tokens),
      "response_tokens_mean": float(np.mean(lengths)) if lengths else 0.0,
      "path": path,
  }
  rundir.write_json(os.path.join(config.output_dir, SUMMARY_FILE), summary)
  _log(
      f"[pairs] {len(pairs)} pairs ({left_out} prompts left out: equal or empty responses), mean response "
      f"{summary['response_tokens_mean']:.1f} tokens -> {path}"
  )
  return summary
