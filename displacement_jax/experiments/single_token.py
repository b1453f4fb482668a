"""Single-token persona experiments on one prompt (Section 3): the pieces the demo and the theory check share.

The SFT data (y+ drawn from the row's answer group, as the paper does), the prompt's collated batch, the theory's
rates for every ordered pair of candidate tokens (Theorem 1 in the unconstrained-features model; the exact
full-network rate from the general identity, via autodiff), DPO on one prompt recording the whole next-token
distribution after every step, and the summary / plot of such a trajectory.
"""

from __future__ import annotations

import copy
import os
import shutil
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from displacement_jax import displacement as monitor_lib
from displacement_jax import forward, losses, plots, rundir, runtime, theory
from displacement_jax.train import lora as lora_train
from displacement_jax.train import metrics as metrics_lib
from displacement_jax.train import optim as optim_lib
from displacement_jax.train import step as step_lib
from displacement_jax.data import batching, tokenize
from displacement_jax.data.layout import bucket_length, pad_id_of
from displacement_jax.errors import UsageError
from displacement_jax.experiments import common, persona_data
from displacement_jax.models import lora, peft_io


def single_token_words(tokenizer: Any, words: Sequence[str]) -> tuple[list[int], list[str], list[str]]:
  """(ids, words found, words missing): a word counts when it is exactly one vocabulary entry ("Yes", not "ĠYes"):
  the token an assistant turn starts with."""
  vocab = tokenizer.get_vocab()
  ids, found, missing = [], [], []
  for w in words:
    if w in vocab:
      ids.append(int(vocab[w]))
      found.append(w)
    else:
      missing.append(w)
  return ids, found, missing


def answer_groups(tokenizer: Any) -> tuple[tuple[str, ...], tuple[str, ...], list[str]]:
  """(yes group, no group, left out): the paper's answer groups (persona_data.YES_TOKENS / NO_TOKENS) without
  the words that are not one token of this tokenizer (SmolLM2: "Absolutely" is two)."""
  _, yes, out_yes = single_token_words(tokenizer, persona_data.YES_TOKENS)
  _, no, out_no = single_token_words(tokenizer, persona_data.NO_TOKENS)
  if not yes or not no:
    raise ValueError(f"no single-token answer left in a group (yes {yes}, no {no}) for this tokenizer")
  return tuple(yes), tuple(no), out_yes + out_no


def sft_answer_groups(
    config: ml_collections.ConfigDict, log: Callable[[str], None] = print
) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """`answer_groups` of the config's tokenizer (no weights loaded), saying which words it left out."""
  yes, no, left_out = answer_groups(runtime.load_tokenizer(config))
  if left_out:
    log(f"[sft] not one token of this tokenizer, left out of the answer groups: {left_out}")
  return yes, no


def write_sft_data(examples: Sequence[Any], path: str, seed: int, groups: tuple[Sequence[str], Sequence[str]]) -> int:
  """Section 3 SFT data of persona examples as generic preference jsonl: (y+, y-) by `persona_data.sft_answer`
  (the authors' rule: a "Yes" row is trained towards a no-word), drawn with `seed`. Returns the rows written."""
  rng = np.random.default_rng(seed)
  rows = []
  for ex in examples:
    answer = (ex.chosen if isinstance(ex.chosen, str) else ex.chosen[-1]["content"]).strip()
    if answer not in ("Yes", "No"):
      raise ValueError(f'{ex.source or "persona data"} row {ex.index}: expected answers "Yes"/"No", got {answer!r}')
    chosen, rejected = persona_data.sft_answer(answer == "Yes", rng, groups)
    rows.append({"prompt": ex.prompt, "chosen": chosen, "rejected": rejected, "index": ex.index})
  rundir.write_jsonl(path, rows)
  return len(examples)


def sft_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The train.loop.run config of the SFT phase (cross-entropy, single-token) derived from an experiment's config
  (its `sft` block: lr, batch_size, num_steps, num_epochs): data in output_dir/sft, no checkpoint kept."""
  out_dir = os.path.join(config.output_dir, "sft")
  return common.train_config(
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
          "checkpoint.at_end": False,
          "export_hf": False,
          "reference.cache": False,
      },
  )


def run_sft(
    config: ml_collections.ConfigDict, examples: Sequence[Any], *, log: Callable[[str], None] = print
) -> tuple[runtime.Loaded, list[float]]:
  """The SFT phase (cross-entropy, single-token; `SFTOnPrompts`, the batches and step of `train.loop.run`) on persona
  `examples`, its data in output_dir/sft (started afresh): (the model with its params after SFT, the SFT losses).

  LoRA (config.model.lora): the SFT trains adapters only (`train.lora.attach`'s, fresh or model.lora.path's),
  writes them as a PEFT adapter directory (output_dir/sft/adapter) and merges them into the base params
  (`models.lora.merge`, PEFT's merge_and_unload): the returned params are that merged SFT model, the base (and
  reference) of the DPO phase, whose own fresh adapters (`start_adapters`) then start at it exactly."""
  sft_cfg = sft_config(config)
  if os.path.isdir(sft_cfg.output_dir):  # a pipeline's own scratch run
    shutil.rmtree(sft_cfg.output_dir)
  os.makedirs(sft_cfg.output_dir)
  yes, no = sft_answer_groups(sft_cfg, log)
  write_sft_data(examples, sft_cfg.data.path, int(config.seed), (yes, no))
  rule = f'the authors\' rule: y+ of a " Yes" row drawn from {list(no)}, of a " No" row from {list(yes)}'
  length = f'{sft_cfg.num_steps or sft_cfg.num_epochs} {"steps" if sft_cfg.num_steps else "epoch(s)"}'
  log(
      f"[sft] cross-entropy on {len(examples)} persona prompts of {config.data.path} ({rule}), {length}, "
      f"RMSprop lr {sft_cfg.optim.lr:g}, batch {sft_cfg.batch_size}"
  )
  loaded = runtime.load_model(sft_cfg)  # the model and tokenizer (~6 s for SmolLM2)
  ad = lora_train.attach(loaded, sft_cfg) if lora_train.enabled(sft_cfg) else None
  dataset = runtime.load_data(sft_cfg, loaded.tokenizer, loaded.model_config.vocab_size)
  sft = SFTOnPrompts(loaded.model, sft_cfg)
  if ad is None:
    loaded.params, losses = sft(loaded.params, dataset)
  else:
    adapters, losses = sft(loaded.params, dataset, adapters=ad.initial)
    adapters = jax.device_get(adapters)
    adapter_dir = os.path.join(sft_cfg.output_dir, "adapter")
    peft_io.save_adapter(
        adapters, loaded.model_config, adapter_dir, base_model_name_or_path=loaded.identity.get("path")
    )
    merged = lora.merge(jax.device_get(loaded.params), adapters, loaded.model_config)
    loaded.params = ad.base = jax.tree.map(jnp.asarray, merged)
    log(f"[sft] LoRA r{ad.rank} ({','.join(ad.targets)}): adapters in {adapter_dir}, merged into the base")
  with metrics_lib.MetricsWriter(sft_cfg.output_dir, tensorboard=False) as writer:  # output_dir/sft/metrics.jsonl
    for step, loss in enumerate(losses, start=1):
      writer.write(step, {"loss": loss})
  if losses:
    log(f"[sft] loss {losses[0]:.4f} -> {losses[-1]:.4f}")
  return loaded, losses


def prompt_batch(example: Any, tokenizer: Any, config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """The collated single-token batch ([1, max_length] arrays) of one persona example."""
  pair = tokenize.tokenize_example(
      example, tokenizer, max_length=int(config.data.max_length), format=config.data.format, single_token=True
  )
  base = batching.collate(
      [pair],
      pad_id=pad_id_of(tokenizer),
      padding_side=config.data.get("padding_side", "right"),
      pad_to=bucket_length(pair.max_length, int(config.data.max_length)),  # the prompt's bucket, not max_length
  )
  return {k: v for k, v in base.items() if k.endswith("_BT")}


def answer_mass(
    model: Any, params: Any, examples: Sequence[Any], tokenizer: Any, config: ml_collections.ConfigDict
) -> np.ndarray:
  """[N]: the next-token probability the answer words (`answer_groups`, both groups) hold at the start of each
  example's response under `params`: how much of the mass the SFT put on the answers (the paper's SFT brought
  pi(y+) to 0.85-0.96 before DPO)."""
  yes, no, _ = answer_groups(tokenizer)
  ids, _, _ = single_token_words(tokenizer, list(yes) + list(no))
  next_prob = jax.jit(lambda p, b: forward.next_token_outputs(model, p, b)["prob_BV"][0, jnp.asarray(ids)].sum())
  batches = (prompt_batch(ex, tokenizer, config) for ex in examples)
  return np.array([float(next_prob(params, {k: jnp.asarray(v) for k, v in b.items()})) for b in batches])


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


# ------------------------------------------------------------------------------------------------ theory


def start_of_dpo(model: Any, params: Any, base_batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """{'h_D', 'p_V', 'W_VD'}: the prompt's final hidden state, its next-token distribution and the unembeddings
  (float32 numpy) at `params`."""
  nt = jax.jit(lambda p, b: forward.next_token_outputs(model, p, b))(
      params, {k: jnp.asarray(v) for k, v in base_batch.items()}
  )
  return {
      "h_D": np.asarray(nt["h_BD"][0], np.float32),
      "p_V": np.asarray(nt["prob_BV"][0], np.float32),
      "W_VD": np.asarray(jax.device_get(forward.unembed(model, params)), np.float32).T,
  }


def initial_loss_derivative(objective: str, beta: float) -> float:
  """l' of the objective at the start of DPO (policy = reference, so the margin equals the reference margin)."""
  return float(losses.loss_derivative(objective, 0.0, beta=beta, ref_margin=0.0))


def pair_rates(W_VD: np.ndarray, h_D: np.ndarray, candidates: Sequence[int], loss_derivative: float) -> np.ndarray:
  """[C, C] Theorem 1 rates d/dt ln pi(y+ = c_i) when the loss prefers c_i over c_j (diagonal NaN)."""
  c = len(candidates)
  rates = np.full((c, c), np.nan, np.float64)
  for i, yp in enumerate(candidates):
    for j, yn in enumerate(candidates):
      if i != j:
        rates[i, j] = float(theory.logprob_rate(W_VD, h_D, int(yp), int(yn), loss_derivative=loss_derivative))
  return rates


def network_gram(
    model: Any, params: Any, batch: dict[str, np.ndarray], candidates: Sequence[int], adapters: Any = None
) -> np.ndarray:
  """[C, C] Gram matrix <grad ln pi(c_i|x), grad ln pi(c_j|x)> over ALL network parameters (autodiff), or with
  `adapters` (LoRA) over the adapters alone, the parameters a LoRA run trains, at `params` + `adapters`.

  With it the general identity gives the exact gradient-flow rate of the trained parameters at the start of DPO:
  d/dt ln pi(y+) = -l' (G[+,+] - G[+,-]) (`network_rates`).
  """
  b = {k: jnp.asarray(v) for k, v in batch.items()}
  ids_C = jnp.asarray(list(candidates), jnp.int32)

  @jax.jit
  def gram(p, base):
    logp_C = lambda q: forward.next_token_outputs(model, lora.full_params(base, q), b)["logp_BV"][0, ids_C]
    jac = jax.jacrev(logp_C)(p)  # leaves [C, ...]
    parts = [
        jnp.einsum("cp,dp->cd", g.reshape(len(candidates), -1), g.reshape(len(candidates), -1), precision="highest")
        for g in jax.tree.leaves(jax.tree.map(lambda g: g.astype(jnp.float32), jac))
    ]
    return sum(parts)

  trained, base = (params, None) if adapters is None else (adapters, params)
  return np.asarray(gram(trained, base), np.float64)


def network_rates(gram_CC: np.ndarray, loss_derivative: float) -> np.ndarray:
  """[C, C] full-network gradient-flow rates d/dt ln pi(c_i) when c_i is preferred over c_j (diagonal NaN):
  the general identity -l' <g_i, g_i - g_j> with the Gram matrix of `network_gram`."""
  rates = -loss_derivative * (np.diag(gram_CC)[:, None] - gram_CC)
  np.fill_diagonal(rates, np.nan)
  return rates


def pick_pair(rates_CC: np.ndarray, candidates: Sequence[int]) -> tuple[int, int, float]:
  """(y+, y-, rate) of the most negative rate (first in row-major order on ties)."""
  flat = np.where(np.isnan(rates_CC), np.inf, rates_CC).reshape(-1)
  i, j = divmod(int(np.argmin(flat)), rates_CC.shape[1])
  return int(candidates[i]), int(candidates[j]), float(rates_CC[i, j])


# ---------------------------------------------------------------------------------------------- training


def single_token_labels(batch_np: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """([B] y+, [B] y-): the one chosen / rejected response token of each row of a collated single-token batch."""
  out = []
  for side in ("chosen", "rejected"):
    mask_BT = batch_np[f"{side}_loss_mask_BT"].astype(bool)
    if not (mask_BT.sum(axis=1) == 1).all():
      raise ValueError(f"single-token batches need one loss position per row, got {mask_BT.sum(axis=1).tolist()}")
    out.append(batch_np[f"{side}_labels_BT"][mask_BT].astype(np.int32))
  return out[0], out[1]


def single_token_loss_fn(model: Any, loss_cfg: ml_collections.ConfigDict) -> Callable:
  """loss_fn(params, batch) of `step.make_train_step` in single-token mode: the objective of `loss_cfg` on
  ln pi(y+|x) and ln pi(y-|x) read from ONE forward of each prompt (the two-row pair forward of `train.loop.run`
  computes the same values twice). Batch: the collated arrays plus y_pos_B, y_neg_B, ref_pos_B, ref_neg_B.
  Aux: the [V] log-probs of row 0 (stop-gradient), so recording a trajectory costs no extra forward."""

  def loss_fn(params, batch):
    logp_BV = forward.next_token_outputs(model, params, batch)["logp_BV"]
    rows_B = jnp.arange(logp_BV.shape[0])
    pc, pr = logp_BV[rows_B, batch["y_pos_B"]], logp_BV[rows_B, batch["y_neg_B"]]
    loss, _ = step_lib.preference_loss(loss_cfg, pc, pr, batch["ref_pos_B"], batch["ref_neg_B"])
    return loss, {"logp_V": jax.lax.stop_gradient(logp_BV[0])}

  return loss_fn


def _nonfinite_error(metrics: dict[str, Any], what: str, step: int, lr: float) -> None:
  if int(metrics["nonfinite"]):
    raise FloatingPointError(
        f"non-finite {step_lib.NONFINITE[int(metrics['nonfinite'])]} at {what} step {step} (lr {lr:g}); the update "
        "was skipped and the run stopped"
    )


# The steps below are donated (updated in place, not ~4 fresh model-sized buffers every step) and use the guard that
# checks the loss and gradient before the update (step.make_train_step): they are memory-bound, the full state
# guard would cost about a quarter of each, and nothing is checkpointed (a non-finite step raises).


def jit_step(model: Any, loss_cfg: ml_collections.ConfigDict, optimizer: Any, with_lora: bool) -> Callable:
  """train_step(state, batch, base) of `single_token_loss_fn`, jitted with the state donated: on every param
  (`base` unused: pass None), or with LoRA on the adapters (state.params) combined with the base params `base`
  (`train.lora.adapter_train_step`, its adapter dropout included)."""
  make_loss = lambda m: single_token_loss_fn(m, loss_cfg)
  if with_lora:
    step = lora_train.adapter_train_step(model, make_loss, optimizer, 1, "gradients")
  else:
    full_step = step_lib.make_train_step(make_loss(model), optimizer, 1, "gradients")
    step = lambda state, batch, base: full_step(state, batch)
  return jax.jit(step, donate_argnums=0)


def check_adapters(with_lora: bool, adapters: Any, what: str) -> None:
  """UsageError unless adapters are given exactly when the config asks for LoRA."""
  if with_lora == (adapters is None):
    raise UsageError(
        f"config.model.lora: {what} {'needs' if with_lora else 'got'} adapters (LoRA: the base params and "
        "train.lora.attach's adapters; full fine-tuning: the params alone)"
    )


def start_adapters(loaded: runtime.Loaded, seed: int) -> Any:
  """The fresh adapters a single-prompt DPO run starts from on `loaded.params` (its base: the SFT model), drawn
  with `seed` as `train.loop.run` draws them; None without LoRA."""
  return None if loaded.lora is None else loaded.lora.fresh(loaded.params, seed)


class SFTOnPrompts:
  """Cross-entropy SFT in single-token mode: the batches of `train.loop.run` (data.batching.BatchIterator with its seed,
  shuffle and drop_last) and its step (`step.make_train_step`), one forward of each prompt batch per step.
  `config`: a `train.loop.run` config (`sft_config`): optim, batch_size, num_steps or num_epochs, seed, data.

  LoRA (config.model.lora; `model` applies adapters, see `train.lora.attach`): the params given are the base tree,
  only the adapters given train (their optimizer state alone), as `train.loop.run` trains them."""

  def __init__(self, model: Any, config: ml_collections.ConfigDict):
    self.config = config
    self.model = model
    self.lora = lora_train.enabled(config)
    self.loss_cfg = ml_collections.ConfigDict({"objective": "cross_entropy", "beta": 0.0})
    self.progress = bool(config.get("progress", True))

  def __call__(self, params: Any, dataset: runtime.Dataset, adapters: Any = None) -> tuple[Any, list[float]]:
    """(params after SFT, the loss of every step); LoRA: (adapters after SFT, the losses), `params` the base."""
    check_adapters(self.lora, adapters, "the single-token SFT (SFTOnPrompts)")
    c = self.config
    bs, n = int(c.batch_size), len(dataset.pairs)
    if n < bs:
      raise ValueError(f"the SFT data ({c.data.path}) has {n} rows, fewer than the batch size {bs}")
    steps = int(c.num_steps) if int(c.num_steps) > 0 else int(c.num_epochs) * (n // bs)
    iterator = batching.BatchIterator(
        dataset.pairs,
        bs,
        seed=int(c.seed),
        shuffle=bool(c.data.get("shuffle", True)),
        drop_last=True,
        # every batch padded to the longest prompt of the data: one compiled step (prompts differ by a few tokens)
        pad_to_multiple=-(-max(p.max_length for p in dataset.pairs) // 8) * 8,
        pad_id=dataset.pad_id,
        padding_side=c.data.get("padding_side", "right"),
    )
    optimizer = optim_lib.make_optimizer(c.optim, steps)
    train_step = jit_step(self.model, self.loss_cfg, optimizer, self.lora)
    base, trained = (params, adapters) if self.lora else (None, params)
    # a copy: the caller's params stay valid (the steps donate the state)
    state = step_lib.init_state(jax.tree.map(jnp.copy, trained), optimizer, int(c.seed))
    losses = []
    for step in tqdm(range(1, steps + 1), desc="sft", dynamic_ncols=True, disable=not self.progress, leave=False):
      batch_np = {k: v for k, v in next(iterator).items() if k.endswith("_BT") or k == "index_B"}
      y_pos_B, y_neg_B = single_token_labels(batch_np)
      zeros_B = np.zeros(len(y_pos_B), np.float32)  # cross-entropy has no reference
      batch = {k: jnp.asarray(v) for k, v in batch_np.items()}
      batch.update(y_pos_B=y_pos_B, y_neg_B=y_neg_B, ref_pos_B=zeros_B, ref_neg_B=zeros_B)
      state, metrics = train_step(state, batch, base)
      _nonfinite_error(metrics, "SFT", step, float(c.optim.lr))
      losses.append(float(metrics["loss"]))
    return state.params, losses


class DPOOnOnePrompt:
  """DPO on one prompt from given params with `step.make_train_step` (the step `train.loop.run` uses) on
  `single_token_loss_fn`, recording the whole next-token distribution at every step. Jitted once; call it for as
  many (y+, y-) pairs as needed.

  LoRA (config.model.lora; `model` applies adapters, see `lora_train.attach`): the params given are the base tree,
  only the adapters given to each call train (their optimizer state alone), and the reference is the base model."""

  def __init__(self, model: Any, config: ml_collections.ConfigDict):
    self.steps = int(config.dpo.num_steps)
    self.seed = int(config.seed)
    self.progress = bool(config.get("progress", True))
    self.lora = config.get("model") is not None and lora_train.enabled(config)
    loss_cfg = ml_collections.ConfigDict({"objective": config.dpo.objective, "beta": float(config.dpo.beta)})
    optim_cfg = copy.deepcopy(config.optim)
    with optim_cfg.unlocked():
      optim_cfg.lr = float(config.dpo.lr)
    self.optimizer = optim_lib.make_optimizer(optim_cfg, self.steps)
    self.lr = float(config.dpo.lr)
    loss_fn = single_token_loss_fn(model, loss_cfg)
    self.train_step = jit_step(model, loss_cfg, self.optimizer, self.lora)
    self.next_logp = jax.jit(
        lambda p, b, base: forward.next_token_outputs(model, lora.full_params(base, p), b)["logp_BV"][0]
    )
    self.loss = jax.jit(lambda p, b, base: loss_fn(lora.full_params(base, p), b)[0])

  def __call__(
      self, params: Any, batch_np: dict[str, np.ndarray], steps: int | None = None, adapters: Any = None
  ) -> dict[str, Any]:
    """{'logp_SV': [S+1, V] next-token log-probs at steps 0..S, 'loss_S': [S+1], 'params': final params (LoRA:
    the base combined with the trained adapters)}.

    `batch_np`: `dpo_batch` (a single-token pair; y+ and y- are read from its chosen / rejected labels). LoRA:
    `params` the base tree, `adapters` the initial adapters."""
    check_adapters(self.lora, adapters, "the single-prompt DPO (DPOOnOnePrompt)")
    steps = self.steps if steps is None else int(steps)
    batch = {k: jnp.asarray(v) for k, v in batch_np.items()}
    batch.setdefault("index_B", jnp.arange(len(batch["chosen_input_ids_BT"]), dtype=jnp.int32))  # dropout keys
    batch["y_pos_B"], batch["y_neg_B"] = (jnp.asarray(y) for y in single_token_labels(batch_np))
    base, trained = (params, adapters) if self.lora else (None, params)
    ref_V = self.next_logp({} if self.lora else params, batch, base)  # the base model: the start unless LoRA
    batch["ref_pos_B"], batch["ref_neg_B"] = ref_V[batch["y_pos_B"]], ref_V[batch["y_neg_B"]]
    # a copy: the caller's params stay valid (the steps donate the state)
    state = step_lib.init_state(jax.tree.map(jnp.copy, trained), self.optimizer, self.seed)
    logps, loss = [], []
    for _ in tqdm(range(steps), desc="dpo", dynamic_ncols=True, disable=not self.progress, leave=False):
      state, metrics = self.train_step(state, batch, base)  # metrics: loss and log-probs BEFORE this step's update
      _nonfinite_error(metrics, "DPO", len(loss) + 1, self.lr)
      logps.append(np.asarray(metrics["logp_V"]))
      loss.append(float(metrics["loss"]))
    logps.append(np.asarray(self.next_logp(state.params, batch, base)))
    loss.append(float(self.loss(state.params, batch, base)))
    return {
        "logp_SV": np.stack(logps).astype(np.float32),
        "loss_S": np.asarray(loss, np.float32),
        "params": lora.combine(base, state.params) if self.lora else state.params,
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
  plt = plots.pyplot()

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
  plots.save(fig, path, dpi=100)
