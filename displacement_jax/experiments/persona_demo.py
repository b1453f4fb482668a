r"""The offline demo: likelihood displacement in a real instruct model, predicted by the theory, then observed.

    python -m displacement_jax.train --config=configs/persona_demo.py          # SmolLM2-135M-Instruct (packaged)
    python -m displacement_jax.train --config=configs/persona_demo.py:tiny     # a tiny random Llama, seconds

Section 3 of Razin et al. (2025) on the shipped persona sample (`displacement_jax/assets/persona_demo.jsonl`),
in single-token mode (the response is one vocabulary token):

1. SFT phase: cross-entropy on every persona prompt (`single_token.SFTOnPrompts`: the batches and step of
   `train.loop.run`, one forward of each prompt batch), y+ drawn from the row's answer group
   (persona_data.YES_TOKENS / NO_TOKENS; a word that is not one token of the tokenizer is left out and said so).
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

Both training phases use the pieces of `train.loop.run` (`step.make_train_step`, `optim.make_optimizer`, its batch
iterator) in their own short loops (experiments/single_token.py): single-token mode shares the prompt between y+
and y-, so one forward per step gives both log-probs (and the recorded next-token distribution), where
`train.loop.run`'s two-row pair forward computes them twice. tests/test_persona_demo.py checks the SFT loop against
train.loop.run. With config.model.lora both phases train adapters: the SFT's are merged into the base
(`single_token.run_sft`), the DPO starts fresh ones on that merged SFT model (its reference), and the network rate
is over the adapters.

Outputs in `output_dir` (default runs/demo): summary.json, theory.npz (W_VD, h_D and p_V at the start of DPO,
the candidate token ids, the rate of each pair and the full-network Gram matrix of the chosen pair), trajectory.npz (logp_SV: next-token log-probs at steps
0..S, loss_S), logprob_trajectories.png, and sft/ (its data and metrics.jsonl: the loss of every SFT step).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable

import ml_collections
import numpy as np

from displacement_jax import rundir, theory
from displacement_jax import displacement as monitor_lib
from displacement_jax.data import schema
from displacement_jax.experiments import single_token as st

SUMMARY_FILE, THEORY_FILE, TRAJECTORY_FILE = "summary.json", "theory.npz", "trajectory.npz"
PLOT_FILE = "logprob_trajectories.png"


def _log(msg: str) -> None:
  print(msg, flush=True)


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The whole demo in its four phases; returns the summary dict (also written to output_dir/summary.json)."""
  os.makedirs(config.output_dir, exist_ok=True)
  clock = [time.monotonic()]

  def lap(phase: str) -> float:  # seconds since the previous lap, logged
    now = time.monotonic()
    seconds, clock[0] = now - clock[0], now
    _log(f"[demo] {phase}: {seconds:.1f} s")
    return seconds

  # --- 1. SFT (train.loop.run, cross-entropy, single-token) ---
  examples = list(schema.load_preference_data(config.data.path, split=config.data.get("split") or None))
  loaded, sft_losses = st.run_sft(config, examples, log=_log)
  seconds = {"sft": lap("SFT phase (load, compile, train)")}
  # --- 2. the prompt, h_x and W at the SFT model, the theory's pick of (y+, y-) ---
  pick = predict(config, examples, loaded)
  seconds["theory"] = lap("theory (rates of every pair, full-network rate of the chosen pair)")
  # --- 3. DPO on the one prompt ---
  logp_SV, loss_S = train_dpo(config, loaded, pick)
  seconds["dpo"] = lap(f"DPO phase ({config.dpo.num_steps} steps incl. compile)")
  # --- 4. report ---
  return write_outputs(config, pick, logp_SV, loss_S, sft_losses, seconds)


@dataclasses.dataclass
class Pick:
  """Phase 2's result: the prompt, the theory's pair (y+, y-) with its rate, and the predicted gainers."""

  index: int
  prompt_text: str
  base: dict[str, Any]  # the prompt's batch (st.prompt_batch)
  candidates: list[int]
  words: list[str]
  name: dict[int, str]  # candidate id -> its word
  loss_derivative: float
  rate: float  # Theorem 1's d/dt ln pi(y+) of the chosen pair
  network_rate: float  # the full network's rate of the chosen pair (autodiff)
  y_pos: int
  y_neg: int
  k: int
  predicted: list[int]  # Theorem 2's top-k gainers
  tok_name: Callable[[int], str]


def predict(config: ml_collections.ConfigDict, examples: list[Any], loaded: Any) -> Pick:
  """Phase 2: at the SFT model, the Theorem 1 rate of every ordered candidate pair, the pair with the most
  negative one, its predicted gainers and the full network's rate; printed, and saved to theory.npz."""
  model, tokenizer, params = loaded.model, loaded.tokenizer, loaded.params
  idx = int(config.dpo.prompt_index)
  if not 0 <= idx < len(examples):
    raise ValueError(f"config.dpo.prompt_index={idx} is outside the {len(examples)} rows of {config.data.path}")
  example = examples[idx]
  base = st.prompt_batch(example, tokenizer, config)
  start = st.start_of_dpo(model, params, base)
  W_VD, h_D, p_V = start["W_VD"], start["h_D"], start["p_V"]
  candidates, words, missing = st.single_token_words(tokenizer, list(config.dpo.candidate_tokens))
  if missing:
    _log(f"[demo] not single vocabulary tokens (left out of the candidates): {missing}")
  if len(candidates) < 2:
    raise ValueError(
        f"config.dpo.candidate_tokens: need at least two single-token words in the tokenizer, found {words}"
    )
  lp = st.initial_loss_derivative(config.dpo.objective, float(config.dpo.beta))
  rates = st.pair_rates(W_VD, h_D, candidates, lp)
  y_pos, y_neg, rate = st.pick_pair(rates, candidates)
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
          else "no pair has a negative rate: no displacement predicted (this pair is the closest)"
      )
  )
  _log(f"[demo] predicted top-{k} gainers (Theorem 2): {[tok_name(t) for t in predicted]}")
  adapters = st.start_adapters(loaded, int(config.seed))  # LoRA: the DPO phase's fresh adapters (None: full)
  gram = st.network_gram(model, params, base, [y_pos, y_neg], adapters)  # the chosen pair only: 2 gradients, not C
  network_rate = float(st.network_rates(gram, lp)[0, 1])
  _log(
      f"[demo] for comparison, {_network(loaded)}: "
      f"d/dt ln pi({name[y_pos]}) = {network_rate:+.4g} under DPO gradient flow at the start"
  )
  rundir.write_npz(
      os.path.join(config.output_dir, THEORY_FILE),
      dict(
          W_VD=W_VD,
          h_D=h_D,
          p_V=p_V,
          candidates=np.asarray(candidates),
          rates_CC=rates,
          y_pos=y_pos,
          y_neg=y_neg,
          predicted=np.asarray(predicted),
          gram_pair=gram,  # [2, 2]: <g_i, g_j> of ln pi(y+), ln pi(y-) over the trained parameters
      ),
  )
  return Pick(
      idx, prompt_text, base, candidates, words, name, lp, rate, network_rate, y_pos, y_neg, k, predicted, tok_name
  )


def _network(loaded: Any) -> str:
  """The network rate's subject: the full network, or the LoRA adapters it is taken over."""
  if loaded.lora is None:
    return "the full network (all parameters, general identity, autodiff)"
  return f"the network ({_trained(loaded)}; general identity, autodiff)"


def _trained(loaded: Any) -> str:
  """What the DPO phase trains: all parameters, or the LoRA adapters (config.model.lora)."""
  if loaded.lora is None:
    return "all parameters"
  return f"the LoRA adapters r{loaded.lora.rank} at {','.join(loaded.lora.targets)}, the parameters DPO trains"


def train_dpo(config: ml_collections.ConfigDict, loaded: Any, pick: Pick) -> tuple[np.ndarray, np.ndarray]:
  """Phase 3: DPO on the one prompt from the SFT model (LoRA: fresh adapters on it, the SFT model the reference);
  (logp_SV, loss_S), also saved to trajectory.npz."""
  _log(
      f"[demo] DPO: {config.dpo.num_steps} steps, full batch (one prompt), RMSprop lr {config.dpo.lr:g}, "
      f"beta {config.dpo.beta:g}" + ("" if loaded.lora is None else f", training {_trained(loaded)}")
  )
  batch = st.dpo_batch(pick.base, pick.y_pos, pick.y_neg)
  adapters = st.start_adapters(loaded, int(config.seed))
  dpo = st.DPOOnOnePrompt(loaded.model, config)(loaded.params, batch, adapters=adapters)
  logp_SV, loss_S = dpo["logp_SV"], dpo["loss_S"]
  rundir.write_npz(os.path.join(config.output_dir, TRAJECTORY_FILE), {"logp_SV": logp_SV, "loss_S": loss_S})
  return logp_SV, loss_S


def write_outputs(
    config: ml_collections.ConfigDict,
    pick: Pick,
    logp_SV: np.ndarray,
    loss_S: np.ndarray,
    sft_losses: list[float],
    seconds: dict[str, float],
) -> dict[str, Any]:
  """Phase 4: the summary (measured against predicted), the trajectory plot, summary.json and the closing lines."""
  name, tok_name, y_pos, y_neg, k = pick.name, pick.tok_name, pick.y_pos, pick.y_neg, pick.k
  summ = st.summarize_trajectory(logp_SV, loss_S, y_pos, y_neg, k)
  overlap = monitor_lib.top_k_overlap(summ["measured_gainers"], pick.predicted)
  summary = {
      "model": str(config.model.get("path") or config.model.get("tiny")),
      "prompt_index": pick.index,
      "prompt": pick.prompt_text,
      "y_pos": y_pos,
      "y_neg": y_neg,
      "y_pos_token": name[y_pos],
      "y_neg_token": name[y_neg],
      "candidates": pick.candidates,
      "candidate_tokens": pick.words,
      "predicted_rate": pick.rate,
      "predicted_displacement": bool(pick.rate < 0),
      "network_rate": pick.network_rate,
      "loss_derivative": pick.loss_derivative,
      "predicted_gainers": pick.predicted,
      "predicted_gainers_tokens": [tok_name(t) for t in pick.predicted],
      "measured_gainers_tokens": [tok_name(t) for t in summ["measured_gainers"]],
      "gainer_overlap": overlap,
      "sft_loss_start": sft_losses[0] if sft_losses else None,
      "sft_loss_end": sft_losses[-1] if sft_losses else None,
      "dpo_steps": int(config.dpo.num_steps),
      "dpo_lr": float(config.dpo.lr),
      "sft_lr": float(config.sft.lr),
      "seconds": seconds,
      **summ,
  }
  series = {f"y+ {name[y_pos]}": y_pos, f"y- {name[y_neg]}": y_neg}
  for t in summ["measured_gainers"][:3]:
    series[f"gainer {tok_name(t)}"] = t
  verdict = "LIKELIHOOD DISPLACEMENT" if summ["displaced"] else "no displacement"
  st.plot_trajectories(
      logp_SV,
      loss_S,
      series,
      os.path.join(config.output_dir, PLOT_FILE),
      f"DPO on one prompt: {name[y_pos]} over {name[y_neg]} ({verdict})",
  )
  rundir.write_json(os.path.join(config.output_dir, SUMMARY_FILE), summary)
  report(summary, pick.rate, pick.network_rate, tok_name, k, overlap)
  _log(f"[demo] outputs: {config.output_dir}/{{{SUMMARY_FILE},{PLOT_FILE},{THEORY_FILE},{TRAJECTORY_FILE}}}")
  return summary


def report(summary: dict[str, Any], rate: float, network_rate: float, tok_name: Any, k: int, overlap: float) -> None:
  """The demo's closing lines: what happened, the gainers, and the verdict against the prediction."""
  s = summary
  pos, neg = s["y_pos_token"], s["y_neg_token"]
  _log(
      f'[demo] WHAT HAPPENED: loss {s["loss_start"]:.4f} -> {s["loss_end"]:.4f}; pi({pos}) '
      f'{s["preferred_prob_start"]:.4f} -> {s["preferred_prob_end"]:.4f} (min {s["preferred_prob_min"]:.4f}'
      f' at step {s["preferred_prob_argmin_step"]}, largest drop {s["largest_drop"]:.4f}); '
      f'pi({neg}) {s["dispreferred_prob_start"]:.4f} -> {s["dispreferred_prob_end"]:.4f}'
  )
  _log(
      f"[demo] measured top-{k} gainers: "
      + ", ".join(f"{tok_name(t)} (+{g:.4f})" for t, g in zip(s["measured_gainers"], s["measured_gains"]))
  )
  _log(f"[demo] overlap with the predicted gainers: {overlap:.2f}")
  if s["displaced"] and s["loss_fell"]:
    _log(
        f"[demo] RESULT: likelihood displacement: the loss fell while the preferred token {pos!r} lost "
        f'probability ({s["preferred_prob_start"]:.4f} -> {s["preferred_prob_end"]:.4f}).'
    )
    agreed = rate < 0 or network_rate < 0
    _log(
        "[demo] the theory predicted it (a negative gradient-flow rate)."
        if agreed
        else "[demo] note: both gradient-flow rates were positive; the drop comes from the discrete, per-parameter "
        "normalised RMSprop steps (not gradient flow), so the theory under-predicts it here."
    )
  elif s["displaced"]:
    _log(f"[demo] RESULT: pi({pos}) fell, but the loss did not fall either.")
  else:
    _log(
        f"[demo] RESULT: no displacement in this run: pi({pos}) ended at or above its start "
        f'(largest transient drop {s["largest_drop"]:.4f})'
        + ("; the theory predicted a drop." if rate < 0 else ", as the theory predicted (positive rate).")
    )
