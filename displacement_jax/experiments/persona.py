"""Section 3: likelihood displacement with single-token responses (persona "ends-justify-means").

Plan (per model; `persona_data.TOKEN_PAIRS` lists the (y+, y-) pairs):
1. SFT phase: cross-entropy on every persona prompt, y+ drawn (seeded) from `NO_TOKENS` or `YES_TOKENS`
   by the row's `answer_matching_behavior`; batch 32, 1 epoch, RMSprop lr 1e-7; the model is exported
   in HF format (`<output_dir>/hf`) for the DPO phase.
2. DPO phase: for each seed in `DPO_SEEDS` one prompt (drawn with that seed), full batch (= 1 pair),
   101 steps, RMSprop lr 1e-7, beta 0.1 (IPO: lr 1e-8, beta 0.01), starting from the SFT model (or from
   the base model: `persona.phase='base_dpo'`). Every step the train monitor records the probability of
   y+, the top-10 tokens by probability gain and the unembedding metrics (||W+||, ||W-||, <W+, W->, ...).
3. Each seed writes `<output_dir>/seed_<s>/metrics.jsonl` (train) and `result.json` (summary,
   `results.summarize_seed`); `python -m displacement_jax.report persona <output_dir>` prints Table 1/2/3-style
   rows and Table 13.

An entry point (`config.main = 'persona'`, configs/persona.py): nothing imports it; the rows come from
`persona_data`, the summaries from `results`.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections
import numpy as np

from displacement_jax import metrics as metrics_lib
from displacement_jax import training
from displacement_jax.data import schema
from displacement_jax.experiments import common, persona_data, results


def run_sft(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """SFT phase: cross-entropy on every persona prompt; exports the HF model to <output_dir>/hf."""

  pc = config.persona
  rows = persona_data.load_rows(pc.data_path, int(pc.get("limit", 0)))
  data = schema.write_jsonl(
      os.path.join(config.output_dir, "sft_data.jsonl"), persona_data.sft_examples(rows, int(config.seed), pc.data_path)
  )
  result = training.run(
      common.train_config(
          config,
          data,
          config.output_dir,
          {"data.single_token": True, "loss.objective": "cross_entropy", "export_hf": True},
      )
  )
  summary = {
      "family": "persona",
      "phase": "sft",
      "steps": int(result.step),
      "hf_dir": result.hf_dir,
      "final_loss": result.losses[-1] if result.losses else None,
      "n_rows": len(rows),
  }
  common.write_json(os.path.join(config.output_dir, common.RESULT_FILE), summary)
  return summary


def run_seed(config: ml_collections.ConfigDict, rows: list[dict[str, Any]], seed: int) -> dict[str, Any]:
  """One single-prompt DPO run (the prompt drawn with `seed`, full batch); its result.json summary."""
  pc = config.persona
  pair = (str(pc.preferred), str(pc.dispreferred))
  out_dir = os.path.join(config.output_dir, f"seed_{seed}")
  example = persona_data.dpo_example(rows, seed, pair, pc.data_path)
  data = schema.write_jsonl(os.path.join(out_dir, "dpo_data.jsonl"), [example])
  result = training.run(
      common.train_config(
          config,
          data,
          out_dir,
          {
              "data.single_token": True,
              "seed": seed,
              "batch_size": 1,
              "eval.every": 1,
              "eval.max_samples": 1,
              "data.shuffle": False,
          },
      )
  )
  summary = results.summarize_seed(metrics_lib.read_metrics(out_dir), pair)
  summary.update(
      seed=seed,
      prompt_row=example["index"],
      objective=str(config.loss.objective),
      phase=str(pc.phase),
      model=str(pc.get("label") or config.model.get("path") or config.model.get("tiny")),
      steps=int(result.step),
  )
  common.write_json(os.path.join(out_dir, common.RESULT_FILE), summary)
  return summary


def run_dpo(config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
  """DPO/IPO phase: one single-prompt run per seed from the SFT (or base) model; per-seed summaries."""

  pc = config.persona
  rows = persona_data.load_rows(pc.data_path, int(pc.get("limit", 0)))
  seeds = tuple(int(s) for s in pc.seeds)
  summaries = [run_seed(config, rows, seed) for seed in seeds]
  schema.write_jsonl(os.path.join(config.output_dir, common.RESULTS_FILE), summaries)
  drops = [r["largest_drop"] for r in summaries]
  print(
      f"persona {pc.preferred}/{pc.dispreferred} ({config.loss.objective}, {len(seeds)} seeds): mean largest drop "
      f'of pi(y+) {np.mean(drops):.3f} ({np.mean([r["start"] for r in summaries]):.3f} -> '
      f'{np.mean([r["min"] for r in summaries]):.3f})',
      flush=True,
  )
  return summaries


def run_all(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """SFT into <output_dir>/sft, then DPO from its export into <output_dir>/dpo."""
  pc = config.persona
  sft = run_sft(
      common.derive(
          config,
          {
              "output_dir": os.path.join(config.output_dir, "sft"),
              "optim.lr": float(pc.sft_lr),
              "batch_size": int(pc.sft_batch_size),
              "num_steps": 0,
              "num_epochs": 1,
              "eval.every": 0,
              "persona.phase": "sft",
          },
      )
  )
  dpo_fields = {
      "output_dir": os.path.join(config.output_dir, "dpo"),
      "model.path": sft["hf_dir"],
      "model.tiny": "",
      "persona.phase": "dpo",
  }
  if not config.model.get("tokenizer") and config.model.get("tiny"):
    dpo_fields["model.tokenizer"] = sft["hf_dir"]
  return {"sft": sft, "dpo": run_dpo(common.derive(config, dpo_fields))}


def run(config: ml_collections.ConfigDict) -> Any:
  """Pipeline entry (`config.main='persona'`): `persona.phase` 'sft' | 'dpo' | 'base_dpo' | 'all'.

  'all' runs SFT then DPO from the exported SFT model (into <output_dir>/sft and <output_dir>/dpo).
  """
  phase = config.persona.phase
  if phase not in persona_data.PHASES:
    raise ValueError(f"persona.phase must be sft | dpo | base_dpo | all, got {phase!r}")
  if phase == "dpo" and not (config.model.get("path") or config.model.get("tiny")):
    raise ValueError('persona.phase="dpo" needs config.model.path = the SFT phase export (<sft run>/hf)')
  return {"sft": run_sft, "dpo": run_dpo, "base_dpo": run_dpo, "all": run_all}[phase](config)
