r"""Does the theory's sign predict the direction on a real model? (`config.main = 'theory_check'`)

    python -m displacement_jax.train --config=configs/theory_check.py          # SmolLM2-135M-Instruct
    python -m displacement_jax.train --config=configs/theory_check.py:tiny     # a tiny random Llama, seconds

After the demo's SFT phase (experiments.single_token.run_sft), for each prompt of `check.prompts` and EVERY
ordered pair (y+, y-) of the single-token candidate words:
- predicted: the Theorem 1 rate d/dt ln pi(y+) of DPO gradient flow in the unconstrained-features model
  (`theory.logprob_rate` on the SFT model's h_x and W), and the full-network rate of the general identity,
  -l' <g+, g+ - g->, over ALL parameters (autodiff Gram matrix of the candidates' gradients);
- measured: ln pi(y+) after 1 and after `dpo.num_steps` DPO steps (RMSprop, the paper's lr and beta) from the
  SFT model, minus its start.
Reported: the share of pairs whose measured change has the predicted sign, the Spearman rank correlation of
predicted and measured, for both predictions, and a scatter plot (predicted vs measured). Outputs in output_dir:
pairs.jsonl (one row per prompt and pair), summary.json, theory_vs_measured.png.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
import numpy as np

from displacement_jax import plots, rundir
from displacement_jax.data import schema
from displacement_jax.experiments import common, results
from displacement_jax.experiments import single_token as st

PAIRS_FILE, SUMMARY_FILE, PLOT_FILE = "pairs.jsonl", "summary.json", "theory_vs_measured.png"


def _log(msg: str) -> None:
  print(msg, flush=True)


def check_prompt(loaded: Any, config: ml_collections.ConfigDict, example: Any, idx: int, dpo: Any) -> list[dict]:
  """One row per ordered candidate pair of prompt `idx`: predicted rates and measured log-prob changes."""
  model, tokenizer, params = loaded.model, loaded.tokenizer, loaded.params
  base = st.prompt_batch(example, tokenizer, config)
  start = st.start_of_dpo(model, params, base)
  candidates, words, _ = st.single_token_words(tokenizer, list(config.dpo.candidate_tokens))
  lp = st.initial_loss_derivative(config.dpo.objective, float(config.dpo.beta))
  theorem1 = st.pair_rates(start["W_VD"], start["h_D"], candidates, lp)
  adapters = st.start_adapters(loaded, int(config.seed))  # LoRA: every pair's DPO starts from these (None: full)
  network = st.network_rates(st.network_gram(model, params, base, candidates, adapters), lp)
  rows = []
  for i, y_pos in enumerate(candidates):
    for j, y_neg in enumerate(candidates):
      if i == j:
        continue
      logp_SV = dpo(params, st.dpo_batch(base, y_pos, y_neg), adapters=adapters)["logp_SV"]
      rows.append(
          {
              "prompt_index": idx,
              "y_pos": words[i],
              "y_neg": words[j],
              "preferred_prob_start": float(np.exp(logp_SV[0, y_pos])),
              "theorem1_rate": float(theorem1[i, j]),
              "network_rate": float(network[i, j]),
              "measured_change_step1": float(logp_SV[1, y_pos] - logp_SV[0, y_pos]),
              "measured_change": float(logp_SV[-1, y_pos] - logp_SV[0, y_pos]),
          }
      )
      _log(
          f"[check] prompt {idx} {words[i]:>9} over {words[j]:<9} theorem 1 {theorem1[i, j]:+9.3g}  network "
          f"{network[i, j]:+9.3g}  measured d ln pi(y+) {rows[-1]['measured_change']:+.4f}"
      )
  return rows


def agreement(rows: list[dict[str, Any]]) -> dict[str, Any]:
  """Sign agreement and Spearman correlation of each prediction with each measured change."""
  out: dict[str, Any] = {"pairs": len(rows)}
  for pred in ("theorem1_rate", "network_rate"):
    for measured in ("measured_change_step1", "measured_change"):
      x, y = np.asarray([r[pred] for r in rows]), np.asarray([r[measured] for r in rows])
      out[f"{pred}/{measured}/sign_agreement"] = results.sign_agreement(x, y)
      out[f"{pred}/{measured}/spearman"] = results.spearman(x, y)
  return out


def plot(rows: list[dict[str, Any]], summary: dict[str, Any], path: str) -> str:
  """Predicted rate (x) vs measured change of ln pi(y+) (y), one panel per prediction; quadrants shaded where
  the signs agree."""
  plt = plots.pyplot()

  fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
  y = np.asarray([r["measured_change"] for r in rows])
  for ax, pred, label in zip(
      axes, ("theorem1_rate", "network_rate"), ("Theorem 1 (unconstrained features)", "full network (autodiff)")
  ):
    x = np.asarray([r[pred] for r in rows])
    ax.axhline(0, color="0.6", lw=0.8)
    ax.axvline(0, color="0.6", lw=0.8)
    ax.scatter(x, y, s=14, alpha=0.7)
    key = f"{pred}/measured_change"
    ax.set_title(
        f"{label}\nsign agreement {summary[key + '/sign_agreement']:.2f}, Spearman {summary[key + '/spearman']:.2f}",
        fontsize=10,
    )
    ax.set_xlabel("predicted d/dt ln pi(y+) at the start of DPO")
    ax.set_xscale("symlog", linthresh=max(float(np.percentile(np.abs(x), 10)), 1e-12))
  axes[0].set_ylabel(f"measured change of ln pi(y+) after {summary['dpo_steps']} DPO steps")
  fig.suptitle(f"{summary['model']}: {summary['pairs']} ordered pairs on {len(summary['prompts'])} prompt(s)")
  fig.tight_layout()
  plots.save(fig, path, dpi=100)
  return path


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """SFT, then every ordered pair on every prompt of `check.prompts`; returns (and writes) the summary."""
  os.makedirs(config.output_dir, exist_ok=True)
  examples = list(schema.load_preference_data(config.data.path, split=config.data.get("split") or None))
  prompts = [int(i) for i in config.check.prompts]
  bad = [i for i in prompts if not 0 <= i < len(examples)]
  if bad:
    raise ValueError(f"config.check.prompts {bad} lie outside the {len(examples)} rows of {config.data.path}")
  loaded, _ = st.run_sft(config, examples, log=_log)
  mass_N = st.answer_mass(loaded.model, loaded.params, examples, loaded.tokenizer, config)
  _log(
      f"[check] after SFT the answer words hold {mass_N.mean():.3f} of the next-token mass (mean over "
      f"{len(mass_N)} prompts; {mass_N.min():.3f} to {mass_N.max():.3f}); on the checked prompts "
      f"{[round(float(mass_N[i]), 3) for i in prompts]}"
  )
  dpo = st.DPOOnOnePrompt(loaded.model, config)
  rows = []
  for idx in prompts:
    rows += check_prompt(loaded, config, examples[idx], idx, dpo)
  schema.write_jsonl(os.path.join(config.output_dir, PAIRS_FILE), rows)
  summary = {
      "model": str(config.model.get("path") or config.model.get("tiny")),
      "prompts": prompts,
      "dpo_steps": int(config.dpo.num_steps),
      "dpo_lr": float(config.dpo.lr),
      "beta": float(config.dpo.beta),
      "sft": {k: float(v) for k, v in config.sft.items()},
      "answer_mass_after_sft_mean": float(mass_N.mean()),
      "answer_mass_after_sft_checked": [float(mass_N[i]) for i in prompts],
      **agreement(rows),
  }
  summary["plot"] = plot(rows, summary, os.path.join(config.output_dir, PLOT_FILE))
  rundir.write_json(os.path.join(config.output_dir, SUMMARY_FILE), summary)
  for pred in ("theorem1_rate", "network_rate"):
    for measured in ("measured_change_step1", "measured_change"):
      key = f"{pred}/{measured}"
      _log(
          f"[check] {pred} vs {measured}: sign agreement {summary[key + '/sign_agreement']:.3f}, Spearman "
          f"{summary[key + '/spearman']:+.3f} ({len(rows)} pairs)"
      )
  _log(f"[check] outputs: {config.output_dir}/{{{PAIRS_FILE},{SUMMARY_FILE},{PLOT_FILE}}}")
  return summary
