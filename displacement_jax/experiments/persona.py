"""Section 3: likelihood displacement with single-token responses (persona "ends-justify-means").

Plan (per model; `persona_data.TOKEN_PAIRS` lists the (y+, y-) pairs):
1. SFT phase: cross-entropy on every persona prompt, y+ drawn (seeded) from `NO_TOKENS` or `YES_TOKENS`
   by the row's `answer_matching_behavior` (less the words that are not one token of the tokenizer); batch 32,
   1 epoch, RMSprop lr 1e-7; the model is exported in HF format (`<output_dir>/hf`) for the DPO phase.
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

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from displacement_jax import displacement as monitor_lib
from displacement_jax import forward, rundir, runtime
from displacement_jax.train import lora as lora_train
from displacement_jax.train import loop as training
from displacement_jax.train import metrics as metrics_lib
from displacement_jax.train import monitor as evaluation
from displacement_jax.data import schema
from displacement_jax.errors import UsageError
from displacement_jax.experiments import common, persona_data, results, single_token


def run_sft(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """SFT phase: cross-entropy on every persona prompt; exports the HF model to <output_dir>/hf."""

  pc = config.persona
  rows = persona_data.load_rows(pc.data_path, int(pc.get("limit", 0)))
  groups = single_token.sft_answer_groups(config, functools.partial(print, flush=True))  # SmolLM2: no "Absolutely"
  examples = persona_data.sft_examples(rows, int(config.seed), pc.data_path, groups=groups)
  data = schema.write_jsonl(os.path.join(config.output_dir, "sft_data.jsonl"), examples)
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
  rundir.write_json(os.path.join(config.output_dir, common.RESULT_FILE), summary)
  return summary


def _seed_dir_and_data(
    config: ml_collections.ConfigDict, rows: list[dict[str, Any]], seed: int
) -> tuple[str, str, dict]:
  """(<output_dir>/seed_<s>, its dpo_data.jsonl with the seed's one preference row, that row)."""
  pc = config.persona
  out_dir = os.path.join(config.output_dir, f"seed_{seed}")
  example = persona_data.dpo_example(rows, seed, (str(pc.preferred), str(pc.dispreferred)), pc.data_path)
  return out_dir, schema.write_jsonl(os.path.join(out_dir, "dpo_data.jsonl"), [example]), example


def _finish_seed(config: ml_collections.ConfigDict, out_dir: str, example: dict, seed: int, steps: int) -> dict:
  """The seed's result.json summary from its metrics.jsonl (written and returned)."""
  pc = config.persona
  pair = (str(pc.preferred), str(pc.dispreferred))
  summary = results.summarize_seed(metrics_lib.read_metrics(out_dir), pair)
  summary.update(
      seed=seed,
      prompt_row=example["index"],
      objective=str(config.loss.objective),
      phase=str(pc.phase),
      model=str(pc.get("label") or config.model.get("path") or config.model.get("tiny")),
      steps=int(steps),
  )
  rundir.write_json(os.path.join(out_dir, common.RESULT_FILE), summary)
  return summary


def run_seed(config: ml_collections.ConfigDict, rows: list[dict[str, Any]], seed: int) -> dict[str, Any]:
  """One single-prompt DPO run through `training.run` (the prompt drawn with `seed`, full batch, the monitor every
  step); its result.json summary. The general route (`persona.fast=False`): checkpoints, resume, TensorBoard."""
  out_dir, data, example = _seed_dir_and_data(config, rows, seed)
  overrides = {"data.single_token": True, "seed": seed, "batch_size": 1, "eval.every": 1, "eval.max_samples": 1}
  result = training.run(common.train_config(config, data, out_dir, {**overrides, "data.shuffle": False}))
  return _finish_seed(config, out_dir, example, seed, result.step)


class FastSeeds:
  """Every seed's single-prompt DPO on ONE loaded model and ONE jitted step (`single_token.DPOOnOnePrompt`: the
  step `training.run` uses, one forward of the prompt per step), writing the same metrics.jsonl rows as the
  monitor of `run_seed`: pi(y+), the log-prob changes and the loss every step; the gainers (measured and
  predicted) and the unembedding metrics at step 0 and at the end, the two rows `results.summarize_seed` reads.
  """

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.loaded = runtime.load_model(config)
    self.lora = lora_train.attach(self.loaded, config) if lora_train.enabled(config) else None
    if self.lora is not None and (config.model.lora.get("path") or float(config.model.lora.get("dropout", 0.0))):
      raise UsageError(
          "persona.fast=True trains fresh LoRA adapters without dropout; for config.model.lora.path or .dropout "
          "set persona.fast=False (one training.run per seed)"
      )
    dpo_cfg = common.derive(config, {})
    with dpo_cfg.unlocked():
      dpo_cfg.dpo = ml_collections.ConfigDict(
          {
              "num_steps": int(config.num_steps),
              "objective": str(config.loss.objective),
              "beta": float(config.loss.beta),
              "lr": float(config.optim.lr),
          }
      )
      dpo_cfg.progress = False
    self.dpo = single_token.DPOOnOnePrompt(self.loaded.model, dpo_cfg)
    model = self.loaded.model
    self.next_token = jax.jit(lambda p, b: forward.next_token_outputs(model, p, b))
    self.unembed = jax.jit(lambda p: forward.unembed(model, p))
    self.names = evaluation.token_names(self.loaded.tokenizer, self.loaded.model_config.vocab_size)

  def _full_row(self, params: Any, batch: dict[str, np.ndarray], ref_prob_V, y_pos: int, y_neg: int, step: int):
    nt = jax.device_get(self.next_token(params, {k: jnp.asarray(v) for k, v in batch.items()}))
    W_VD = np.asarray(jax.device_get(self.unembed(params)), np.float32).T
    k = int(self.config.eval.top_k)
    yp, yn = np.array([y_pos]), np.array([y_neg])
    return monitor_lib.single_token_row(
        W_VD, nt["h_BD"][:1], nt["prob_BV"][:1], ref_prob_V, yp, yn, k, step, self.names
    )

  def __call__(self, rows: list[dict[str, Any]], seed: int) -> dict[str, Any]:
    out_dir, data, example = _seed_dir_and_data(self.config, rows, seed)
    (ex,) = schema.load_preference_data(data, schema="generic")
    batch = single_token.prompt_batch(ex, self.loaded.tokenizer, self.config)
    y_pos, y_neg = (
        int(batch[f"{s}_labels_BT"][batch[f"{s}_loss_mask_BT"].astype(bool)][0]) for s in ("chosen", "rejected")
    )
    params = self.loaded.params
    traj = self.dpo(params, batch, adapters=single_token.start_adapters(self.loaded, seed))
    logp_SV, loss_S = traj["logp_SV"], traj["loss_S"]
    steps = logp_SV.shape[0] - 1
    ref_prob_V = np.exp(logp_SV[0].astype(np.float64))
    with metrics_lib.MetricsWriter(out_dir, tensorboard=False) as writer:
      for s in range(steps + 1):
        row: dict[str, Any] = {"monitor/loss": float(loss_S[s])}
        row.update(
            monitor_lib.logprob_change_stats(
                logp_SV[s, [y_pos]], logp_SV[s, [y_neg]], logp_SV[0, [y_pos]], logp_SV[0, [y_neg]]
            )
        )
        row["monitor/preferred_prob"] = float(np.exp(np.float64(logp_SV[s, y_pos])))
        if s in (0, steps):
          row.update(self._full_row(params if s == 0 else traj["params"], batch, ref_prob_V, y_pos, y_neg, s))
        writer.write(s, row)
    return _finish_seed(self.config, out_dir, example, seed, steps)


def run_dpo(config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
  """DPO/IPO phase: one single-prompt run per seed from the SFT (or base) model; per-seed summaries.

  `persona.fast` (default True): every seed on one loaded model and one compiled step (`FastSeeds`); False: one
  `training.run` per seed (`run_seed`). Both give the same summaries (tests/test_experiments_persona.py).
  """

  pc = config.persona
  rows = persona_data.load_rows(pc.data_path, int(pc.get("limit", 0)))
  seeds = tuple(int(s) for s in pc.seeds)
  run_one = FastSeeds(config) if pc.get("fast", True) else functools.partial(run_seed, config)
  summaries = []
  for seed in tqdm(seeds, desc="seeds", dynamic_ncols=True, disable=not config.get("progress", True)):
    summaries.append(run_one(rows, seed))
    r = summaries[-1]
    print(
        f'[persona] seed {seed} (prompt row {r["prompt_row"]}): pi({pc.preferred}) {r["start"]:.4f} -> min '
        f'{r["min"]:.4f} -> {r["end"]:.4f}, top gainers {r["top_k_gainers"][:3]}',
        flush=True,
    )
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
