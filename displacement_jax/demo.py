r"""The offline demo: likelihood displacement in a tiny model, predicted by the theory, then observed.

    python -m displacement_jax.train --config=configs/demo.py

Section 3 of Razin et al. (2025), scaled down to a tiny random Llama and the shipped persona sample
(`displacement_jax/assets/persona_demo.jsonl`), in single-token mode (the response is one vocabulary token):

1. SFT phase: `train.run` with the cross-entropy objective on every persona prompt (y+ = the row's token).
2. Pick one prompt (`dpo.prompt_index`). At the SFT model, compute the final hidden state h_x of the prompt
   and the unembeddings W, and for every ordered pair (y+, y-) of persona tokens the Theorem 1 rate
   d/dt ln pi(y+) (`theory.logprob_rate`) of DPO gradient flow in the unconstrained-features model. The pair
   with the most negative rate (most displacement predicted) is trained; the prediction is printed first.
3. DPO phase on that one prompt (full batch, `dpo.num_steps` steps, RMSprop), recording the whole next-token
   distribution after every step (a [V] vector: cheap in single-token mode).
4. Report: pi(y+) start -> end, its largest drop, the loss start -> end, the measured top gainers (largest
   probability increase) beside the theory's predicted gainers (Theorem 2, `theory.rank_gainers`) and their
   overlap, and whether displacement occurred (pi(y+) at the end below its start). A PNG plots the
   log-prob trajectories of y+, y- and the top gainers.

The DPO phase uses the same pieces as `train.run` (`step_lib.make_loss_fn`, `step_lib.make_train_step`,
`optim.make_optimizer`) in its own short loop, because it must start from the SFT parameters and record the full
next-token distribution at every step, which `train.run` does not expose.

Outputs in `output_dir` (default runs/demo): summary.json, theory.npz (W_VD, h_D and p_V at the start of DPO,
the candidate token ids and the rate of each pair), trajectory.npz (logp_SV: next-token log-probs at steps
0..S, loss_S), logprob_trajectories.png, and sft/ (the SFT run's metrics.jsonl).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from displacement_jax import monitor as monitor_lib
from displacement_jax import optim as optim_lib
from displacement_jax import forward, runtime, training
from displacement_jax import step as step_lib
from displacement_jax import theory
from displacement_jax.data import batching, schema, tokenize
from displacement_jax.data.layout import pad_id_of
from displacement_jax.experiments import common as experiments_common
from displacement_jax import losses

SUMMARY_FILE, THEORY_FILE, TRAJECTORY_FILE = "summary.json", "theory.npz", "trajectory.npz"
PLOT_FILE = "logprob_trajectories.png"
PERSONA_TOKENS = ("Yes", "No", "Never", "Maybe", "Perhaps", "Yeah", "Sure", "Certainly", "Absolutely")


def _log(msg: str) -> None:
  print(msg, flush=True)


# ------------------------------------------------------------------------------------------------ theory


def pair_rates(W_VD: np.ndarray, h_D: np.ndarray, candidates: Sequence[int], loss_derivative: float) -> np.ndarray:
  """[C, C] Theorem 1 rates d/dt ln pi(y+ = c_i) when the loss prefers c_i over c_j (diagonal NaN)."""

  c = len(candidates)
  rates = np.full((c, c), np.nan, np.float64)
  for i, yp in enumerate(candidates):
    for j, yn in enumerate(candidates):
      if i != j:
        rates[i, j] = float(theory.logprob_rate(W_VD, h_D, int(yp), int(yn), loss_derivative=loss_derivative))
  return rates


def network_gram(model: Any, params: Any, batch: dict[str, np.ndarray], candidates: Sequence[int]) -> np.ndarray:
  """[C, C] Gram matrix <grad ln pi(c_i|x), grad ln pi(c_j|x)> over ALL network parameters (autodiff).

  With it the general identity gives the exact gradient-flow rate of the full network at the start of DPO:
  d/dt ln pi(y+) = -l' (G[+,+] - G[+,-]), l' = -beta/2 for DPO at the reference point (margin = ref margin).
  """
  b = {k: jnp.asarray(v) for k, v in batch.items()}

  def logp(p, tok):
    return jnp.log(forward.next_token_outputs(model, p, b)["prob_BV"][0, tok])

  grad_fn = jax.jit(jax.grad(logp))
  flat = [
      jnp.concatenate([jnp.ravel(g).astype(jnp.float32) for g in jax.tree.leaves(grad_fn(params, int(c)))])
      for c in candidates
  ]
  g_CP = jnp.stack(flat)
  return np.asarray(jnp.einsum("cp,dp->cd", g_CP, g_CP, precision=jax.lax.Precision.HIGHEST), np.float64)


def pick_pair(rates_CC: np.ndarray, candidates: Sequence[int]) -> tuple[int, int, float]:
  """(y+, y-, rate) of the most negative rate (first in row-major order on ties)."""
  flat = np.where(np.isnan(rates_CC), np.inf, rates_CC).reshape(-1)
  i, j = divmod(int(np.argmin(flat)), rates_CC.shape[1])
  return int(candidates[i]), int(candidates[j]), float(rates_CC[i, j])


def persona_token_ids(tokenizer: Any, words: Sequence[str]) -> tuple[list[int], list[str], list[str]]:
  """(ids, words found, words missing): each word must be exactly one vocabulary entry."""
  vocab = tokenizer.get_vocab()
  ids, found, missing = [], [], []
  for w in words:
    if w in vocab:
      ids.append(int(vocab[w]))
      found.append(w)
    else:
      missing.append(w)
  return ids, found, missing


# ---------------------------------------------------------------------------------------------- phases


YES_GROUP = ("Yes", "Yeah", "Sure", "Certainly", "Absolutely")
NO_GROUP = ("No", "Never", "Maybe", "Perhaps")


def write_sft_data(examples: Sequence[Any], path: str, seed: int) -> int:
  """Section 3 SFT data as generic preference jsonl: y+ drawn (seeded) from the row's answer group.

  A row whose preferred answer is "Yes" gets y+ from YES_GROUP, "No" from NO_GROUP (the paper's SFT phase);
  y- is drawn from the other group (unused by cross-entropy). Returns the number of rows written.
  """
  rng = np.random.default_rng(seed)
  with open(path, "w") as f:
    for ex in examples:
      answer = (ex.chosen if isinstance(ex.chosen, str) else ex.chosen[-1]["content"]).strip()
      if answer not in ("Yes", "No"):
        raise ValueError(
            f'{ex.source or "persona data"} row {ex.index}: the demo expects answers "Yes"/"No", ' f"got {answer!r}"
        )
      pos, neg = (YES_GROUP, NO_GROUP) if answer == "Yes" else (NO_GROUP, YES_GROUP)
      f.write(
          json.dumps(
              {
                  "prompt": ex.prompt,
                  "chosen": str(rng.choice(pos)),
                  "rejected": str(rng.choice(neg)),
                  "index": int(ex.index),
              }
          )
          + "\n"
      )
  return len(examples)


def sft_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The train.run config of the SFT phase (cross-entropy, single-token) derived from the demo config."""
  out_dir = os.path.join(config.output_dir, "sft")
  return experiments_common.train_config(
      config,
      os.path.join(out_dir, "sft_data.jsonl"),
      out_dir,
      {
          "loss.objective": "cross_entropy",
          "data.single_token": True,
          "optim.lr": float(config.sft.lr),
          "batch_size": int(config.sft.batch_size),
          "num_steps": int(config.sft.num_steps),
          "num_epochs": int(config.sft.num_epochs),
          "eval.every": 0,
          "checkpoint.every": 0,
          "export_hf": False,
          "reference.cache": False,
      },
  )


def dpo_batch(base_batch: dict[str, np.ndarray], y_pos: int, y_neg: int) -> dict[str, np.ndarray]:
  """One collated single-token pair with its responses replaced by y+ (chosen) and y- (rejected)."""
  batch = {k: np.array(v) for k, v in base_batch.items()}
  for side, tok in (("chosen", y_pos), ("rejected", y_neg)):
    mask_BT = batch[f"{side}_loss_mask_BT"].astype(bool)
    if mask_BT.sum() != mask_BT.shape[0]:
      raise ValueError(
          f"dpo_batch needs single-token pairs (one loss position per row), got "
          f"{int(mask_BT.sum())} positions in {mask_BT.shape[0]} rows of {side}_loss_mask_BT"
      )
    rows, pos = np.nonzero(mask_BT)
    batch[f"{side}_labels_BT"][rows, pos] = tok
    batch[f"{side}_input_ids_BT"][rows, pos + 1] = tok
  return batch


def run_dpo(
    model: Any, params: Any, batch_np: dict[str, np.ndarray], config: ml_collections.ConfigDict
) -> dict[str, np.ndarray]:
  """DPO on one full batch for dpo.num_steps steps; returns logp_SV (steps 0..S), loss_S, final params."""
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

  chunk = int(config.logprob_chunk_size)
  steps = int(config.dpo.num_steps)
  batch = {k: jnp.asarray(v) for k, v in batch_np.items()}
  ref = jax.jit(lambda p, b: forward.pair_logps(model, p, b, chunk))(params, batch)
  batch = dict(batch, chosen_ref_logps_B=ref["chosen_logps_B"], rejected_ref_logps_B=ref["rejected_logps_B"])
  loss_cfg = ml_collections.ConfigDict({"objective": config.dpo.objective, "beta": float(config.dpo.beta)})
  optim_cfg = copy.deepcopy(config.optim)
  with optim_cfg.unlocked():
    optim_cfg.lr = float(config.dpo.lr)
  optimizer = optim_lib.make_optimizer(optim_cfg, steps)
  loss_fn = step_lib.make_loss_fn(model, loss_cfg, chunk)
  train_step = jax.jit(step_lib.make_train_step(loss_fn, optimizer, 1))
  next_logp = jax.jit(lambda p, b: jnp.log(forward.next_token_outputs(model, p, b)["prob_BV"][0]))
  eval_loss = jax.jit(lambda p, b: loss_fn(p, b)[0])
  state = step_lib.TrainState(
      params=params,
      opt_state=optimizer.init(params),
      step=jnp.zeros((), jnp.int32),
      rng=jax.random.key_data(jax.random.key(int(config.seed))),
  )
  logps, losses = [np.asarray(next_logp(params, batch))], [float(eval_loss(params, batch))]
  for _ in tqdm(range(steps), desc="dpo", dynamic_ncols=True, disable=not config.get("progress", True)):
    state, _ = train_step(state, batch)
    logps.append(np.asarray(next_logp(state.params, batch)))
    losses.append(float(eval_loss(state.params, batch)))
  return {
      "logp_SV": np.stack(logps).astype(np.float32),
      "loss_S": np.asarray(losses, np.float32),
      "params": jax.device_get(state.params),
  }


# ---------------------------------------------------------------------------------------------- report


def summarize_trajectory(logp_SV: np.ndarray, loss_S: np.ndarray, y_pos: int, y_neg: int, top_k: int) -> dict[str, Any]:
  """Start/end/min of pi(y+), largest drop, loss start/end, measured top-k gainers, displacement flag."""
  p_pos = np.exp(logp_SV[:, y_pos].astype(np.float64))
  p_start_V, p_end_V = np.exp(logp_SV[0].astype(np.float64)), np.exp(logp_SV[-1].astype(np.float64))
  gainers = monitor_lib.top_k_gainers(p_end_V, p_start_V, top_k, exclude=(y_pos, y_neg))
  return {
      "preferred_prob_start": float(p_pos[0]),
      "preferred_prob_end": float(p_pos[-1]),
      "preferred_prob_min": float(p_pos.min()),
      "preferred_prob_argmin_step": int(p_pos.argmin()),
      "largest_drop": float(p_pos[0] - p_pos.min()),
      "preferred_logprob_start": float(logp_SV[0, y_pos]),
      "preferred_logprob_end": float(logp_SV[-1, y_pos]),
      "dispreferred_prob_start": float(np.exp(logp_SV[0, y_neg])),
      "dispreferred_prob_end": float(np.exp(logp_SV[-1, y_neg])),
      "loss_start": float(loss_S[0]),
      "loss_end": float(loss_S[-1]),
      "loss_fell": bool(loss_S[-1] < loss_S[0]),
      "displaced": bool(p_pos[-1] < p_pos[0]),
      "measured_gainers": [int(t) for t in gainers],
      "measured_gains": [float(p_end_V[t] - p_start_V[t]) for t in gainers],
  }


def plot_trajectories(logp_SV: np.ndarray, loss_S: np.ndarray, series: dict[str, int], path: str, title: str) -> None:
  """ln pi(token) vs step for each named token (top panel) and the DPO loss (bottom panel)."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, (ax, ax_loss) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(3, 1))
  steps = np.arange(logp_SV.shape[0])
  for i, (label, tok) in enumerate(series.items()):
    ax.plot(steps, logp_SV[:, tok], lw=2.5 if i < 2 else 1.2, ls="-" if i < 2 else "--", label=label)
  ax.set_ylabel("ln pi(token | x)")
  ax.legend(fontsize=8, loc="best")
  ax.set_title(title, fontsize=10)
  ax_loss.plot(steps, loss_S, color="k")
  ax_loss.set_ylabel("DPO loss")
  ax_loss.set_xlabel("DPO step")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


# -------------------------------------------------------------------------------------------------- run


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The whole demo; returns the summary dict (also written to output_dir/summary.json)."""

  os.makedirs(config.output_dir, exist_ok=True)

  # --- 1. SFT (train.run, cross-entropy, single-token) ---
  examples = list(schema.load_preference_data(config.data.path, split=config.data.get("split") or None))
  sft_cfg = sft_config(config)
  if os.path.isdir(sft_cfg.output_dir):  # the demo's own scratch run: start it afresh on every demo run
    shutil.rmtree(sft_cfg.output_dir)
  os.makedirs(sft_cfg.output_dir)
  write_sft_data(examples, sft_cfg.data.path, int(config.seed))
  _log(
      f"[demo] SFT: cross-entropy on {len(examples)} persona prompts of {config.data.path} (y+ drawn from the "
      f"answer's token group), {sft_cfg.num_steps or sft_cfg.num_epochs} "
      f'{"steps" if sft_cfg.num_steps else "epochs"}, RMSprop lr {sft_cfg.optim.lr:g}, batch {sft_cfg.batch_size}'
  )
  sft = training.run(sft_cfg)
  loaded = runtime.load_model(sft_cfg)
  model, tokenizer, params = loaded.model, loaded.tokenizer, sft.params
  sft_losses = sft.losses
  if sft_losses:
    _log(f"[demo] SFT loss {sft_losses[0]:.4f} -> {sft_losses[-1]:.4f}")

  # --- 2. the prompt, h_x and W at the SFT model, the theory's pick of (y+, y-) ---
  idx = int(config.dpo.prompt_index)
  if not 0 <= idx < len(examples):
    raise ValueError(f"config.dpo.prompt_index={idx} is outside the {len(examples)} rows of {config.data.path}")
  example = examples[idx]
  pair = tokenize.tokenize_example(
      example, tokenizer, max_length=int(config.data.max_length), format=config.data.format, single_token=True
  )
  pad_id = pad_id_of(tokenizer)
  base = batching.collate(
      [pair], pad_id=pad_id, padding_side=config.data.get("padding_side", "right"), pad_to=int(config.data.max_length)
  )
  base = {k: v for k, v in base.items() if k.endswith("_BT")}
  nt = jax.jit(lambda p, b: forward.next_token_outputs(model, p, b))(
      params, {k: jnp.asarray(v) for k, v in base.items()}
  )
  h_D = np.asarray(nt["h_BD"][0], np.float32)
  p_V = np.asarray(nt["prob_BV"][0], np.float32)
  W_VD = np.asarray(jax.device_get(forward.unembed(model, params)), np.float32).T

  candidates, words, missing = persona_token_ids(tokenizer, list(config.dpo.candidate_tokens))
  if missing:
    _log(f"[demo] not single vocabulary tokens (skipped): {missing}")
  if len(candidates) < 2:
    raise ValueError(
        f"config.dpo.candidate_tokens: need at least two single-token words in the tokenizer, " f"found {words}"
    )
  # l' of the objective at the start of DPO (policy = reference, so the margin equals the reference margin).
  lp = float(losses.loss_derivative(config.dpo.objective, 0.0, beta=float(config.dpo.beta), ref_margin=0.0))
  rates = pair_rates(W_VD, h_D, candidates, lp)
  y_pos, y_neg, rate = pick_pair(rates, candidates)
  name = dict(zip(candidates, words))
  k = min(int(config.dpo.top_k), W_VD.shape[0] - 2)
  predicted = [int(t) for t in np.asarray(theory.rank_gainers(W_VD, h_D, y_pos, y_neg, loss_derivative=lp))[:k]]
  vocab_names = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
  tok_name = lambda t: vocab_names[t] if t < len(vocab_names) else f"<id {t}>"
  prompt_text = example.prompt if isinstance(example.prompt, str) else json.dumps(example.prompt)
  _log(f"[demo] prompt #{idx}: {prompt_text[:100]!r}")
  _log(f"[demo] after SFT: " + ", ".join(f"pi({w})={p_V[c]:.3f}" for c, w in zip(candidates, words)))
  _log(
      f"[demo] PREDICTION (Theorem 1, unconstrained features, gradient flow): of {len(candidates)} x "
      f"{len(candidates) - 1} ordered pairs, y+={name[y_pos]!r} over y-={name[y_neg]!r} has the most negative "
      f"rate d/dt ln pi(y+) = {rate:+.4g} -> "
      + (
          "displacement predicted"
          if rate < 0
          else "no pair has a negative rate: no displacement predicted " "(this pair is the closest)"
      )
  )
  _log(f"[demo] predicted top-{k} gainers (Theorem 2): {[tok_name(t) for t in predicted]}")
  gram = network_gram(model, params, base, candidates)
  i, j = candidates.index(y_pos), candidates.index(y_neg)
  network_rate = -lp * (gram[i, i] - gram[i, j])
  _log(
      f"[demo] for comparison, the full network (all parameters, general identity, autodiff): "
      f"d/dt ln pi({name[y_pos]}) = {network_rate:+.4g} under DPO gradient flow at the start"
  )
  np.savez(
      os.path.join(config.output_dir, THEORY_FILE),
      W_VD=W_VD,
      h_D=h_D,
      p_V=p_V,
      candidates=np.asarray(candidates),
      rates_CC=rates,
      y_pos=y_pos,
      y_neg=y_neg,
      predicted=np.asarray(predicted),
      gram_CC=gram,
  )

  # --- 3. DPO on the one prompt ---
  _log(
      f"[demo] DPO: {config.dpo.num_steps} steps, full batch (one prompt), RMSprop lr {config.dpo.lr:g}, "
      f"beta {config.dpo.beta:g}"
  )
  dpo = run_dpo(model, params, dpo_batch(base, y_pos, y_neg), config)
  logp_SV, loss_S = dpo["logp_SV"], dpo["loss_S"]
  np.savez(os.path.join(config.output_dir, TRAJECTORY_FILE), logp_SV=logp_SV, loss_S=loss_S)

  # --- 4. report ---
  summ = summarize_trajectory(logp_SV, loss_S, y_pos, y_neg, k)
  overlap = monitor_lib.top_k_overlap(summ["measured_gainers"], predicted)
  summary = {
      "prompt_index": idx,
      "prompt": prompt_text,
      "y_pos": y_pos,
      "y_neg": y_neg,
      "y_pos_token": name[y_pos],
      "y_neg_token": name[y_neg],
      "candidates": candidates,
      "candidate_tokens": words,
      "predicted_rate": rate,
      "predicted_displacement": bool(rate < 0),
      "network_rate": network_rate,
      "loss_derivative": lp,
      "predicted_gainers": predicted,
      "predicted_gainers_tokens": [tok_name(t) for t in predicted],
      "measured_gainers_tokens": [tok_name(t) for t in summ["measured_gainers"]],
      "gainer_overlap": overlap,
      "sft_loss_start": sft_losses[0] if sft_losses else None,
      "sft_loss_end": sft_losses[-1] if sft_losses else None,
      "dpo_steps": int(config.dpo.num_steps),
      "dpo_lr": float(config.dpo.lr),
      "sft_lr": float(config.sft.lr),
      **summ,
  }
  series = {f"y+ {name[y_pos]}": y_pos, f"y- {name[y_neg]}": y_neg}
  for t in summ["measured_gainers"][:3]:
    series[f"gainer {tok_name(t)}"] = t
  verdict = "LIKELIHOOD DISPLACEMENT" if summ["displaced"] else "no displacement"
  plot_trajectories(
      logp_SV,
      loss_S,
      series,
      os.path.join(config.output_dir, PLOT_FILE),
      f"DPO on one prompt: {name[y_pos]} over {name[y_neg]} ({verdict})",
  )
  with open(os.path.join(config.output_dir, SUMMARY_FILE), "w") as f:
    json.dump(summary, f, indent=1)

  _log(
      f'[demo] WHAT HAPPENED: loss {summ["loss_start"]:.4f} -> {summ["loss_end"]:.4f}; pi({name[y_pos]}) '
      f'{summ["preferred_prob_start"]:.4f} -> {summ["preferred_prob_end"]:.4f} (min {summ["preferred_prob_min"]:.4f}'
      f' at step {summ["preferred_prob_argmin_step"]}, largest drop {summ["largest_drop"]:.4f}); '
      f'pi({name[y_neg]}) {summ["dispreferred_prob_start"]:.4f} -> {summ["dispreferred_prob_end"]:.4f}'
  )
  _log(
      f"[demo] measured top-{k} gainers: "
      + ", ".join(f"{tok_name(t)} (+{g:.4f})" for t, g in zip(summ["measured_gainers"], summ["measured_gains"]))
  )
  _log(f"[demo] overlap with the predicted gainers: {overlap:.2f}")
  if summ["displaced"] and summ["loss_fell"]:
    _log(
        f"[demo] RESULT: likelihood displacement: the loss fell while the preferred token {name[y_pos]!r} lost "
        f'probability ({summ["preferred_prob_start"]:.4f} -> {summ["preferred_prob_end"]:.4f}).'
    )
    if rate >= 0 and network_rate >= 0:
      _log(
          "[demo] note: both gradient-flow rates were positive; the drop comes from the discrete, per-parameter "
          "normalised RMSprop steps (not gradient flow), so the theory under-predicts it here."
      )
  elif summ["displaced"]:
    _log(f"[demo] RESULT: pi({name[y_pos]}) fell, but the loss did not fall either.")
  else:
    _log(
        f"[demo] RESULT: no displacement in this run: pi({name[y_pos]}) ended at or above its start "
        f'(largest transient drop {summ["largest_drop"]:.4f}).'
    )
  _log(f"[demo] outputs: {config.output_dir}/{{{SUMMARY_FILE},{PLOT_FILE},{THEORY_FILE},{TRAJECTORY_FILE}}}")
  return summary
