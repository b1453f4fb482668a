"""KV-cache generation for `displacement_jax.models.Transformer`: greedy or sampled (temperature, top-k, top-p).

Batched with LEFT padding; one jitted program per (config, prompt length, max_new_tokens, sampling mode):
a prefill call fills the cache, then a `lax.while_loop` appends one token per step until every row has
emitted EOS or `max_new_tokens` is reached. Tokens after a row's EOS are `pad_token_id`.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from displacement_jax.models.config import ModelConfig
from displacement_jax.models.transformer import Transformer, init_cache, unembedding

Array = jax.Array


class GenerateOutput(NamedTuple):
  """tokens_BN: generated ids [B, max_new_tokens] (pad after EOS); lengths_B: tokens up to and including EOS."""

  tokens_BN: Array
  lengths_B: Array


def filter_logits(logits_BV: Array, *, temperature: float | Array, top_k: int = 0, top_p: float | Array = 1.0) -> Array:
  """Float32 logits / temperature with everything outside the top-k and the top-p nucleus set to -inf.

  top_k=0 and top_p=1.0 disable the filters; the most likely token is always kept. A Python top_p >= 1.0 skips the
  nucleus (a sort of the [B, V] logits per step: more than the decode step's own cost on CPU at V=49152).
  """
  logits_BV = logits_BV.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
  if top_k > 0:
    kth_B1 = jax.lax.top_k(logits_BV, min(top_k, logits_BV.shape[-1]))[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  if isinstance(top_p, (int, float)) and top_p >= 1.0:
    return logits_BV
  sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
  probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
  mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
  keep_BV = mass_before_BV < jnp.asarray(top_p, jnp.float32)
  keep_BV = keep_BV.at[:, 0].set(True)
  cutoff_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)


def _next_token(
    logits_BV: Array, rng: Array, sample: bool, temperature: Array, top_k: int, top_p: Array | float
) -> Array:
  if not sample:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  filtered = filter_logits(logits_BV, temperature=temperature, top_k=top_k, top_p=top_p)
  return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)


@functools.lru_cache(maxsize=32)
def _compiled(config: ModelConfig, max_new_tokens: int, sample: bool, top_k: int, nucleus: bool):
  model = Transformer(config)

  def run(params, ids_BT, mask_BT, rng, temperature, top_p_arg, eos_E, pad_id):
    top_p = top_p_arg if nucleus else 1.0  # static 1.0: no sort
    b, t = ids_BT.shape
    cache = init_cache(config, b, t + max_new_tokens)
    # Prefill without the fp32 [B, T, V] logits: only the last slot (every row's last real token) is needed.
    out = model.apply({"params": params}, ids_BT, mask_BT, cache=cache, return_logits=False, return_hidden=True)
    unembed_DV = unembedding(params, config).astype(out.hidden_BTD.dtype)
    last_BV = jnp.einsum("bd,dv->bv", out.hidden_BTD[:, -1], unembed_DV, preferred_element_type=jnp.float32)
    rng, sub = jax.random.split(rng)
    tok_B = _next_token(last_BV, sub, sample, temperature, top_k, top_p)
    tokens_BN = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok_B)
    done_B = jnp.isin(tok_B, eos_E)
    lengths_B = jnp.ones((b,), jnp.int32)

    def cond(state):
      step, _, _, done_B, _, _ = state
      return (step < max_new_tokens) & ~jnp.all(done_B)

    def body(state):
      step, cache, tokens_BN, done_B, lengths_B, rng = state
      prev_B = tokens_BN[:, step - 1]
      out = model.apply({"params": params}, prev_B[:, None], jnp.ones((b, 1), bool), cache=cache)
      rng, sub = jax.random.split(rng)
      tok_B = _next_token(out.logits_BTV[:, 0], sub, sample, temperature, top_k, top_p)
      tok_B = jnp.where(done_B, pad_id, tok_B)
      tokens_BN = tokens_BN.at[:, step].set(tok_B)
      lengths_B = lengths_B + (~done_B).astype(jnp.int32)
      done_B = done_B | jnp.isin(tok_B, eos_E)
      return step + 1, out.cache, tokens_BN, done_B, lengths_B, rng

    state = (jnp.int32(1), out.cache, tokens_BN, done_B, lengths_B, rng)
    _, _, tokens_BN, _, lengths_B, _ = jax.lax.while_loop(cond, body, state)
    return tokens_BN, lengths_B

  return jax.jit(run)


def left_pad(
    prompts: Sequence[Sequence[int]], pad_token_id: int, *, multiple: int = 1
) -> tuple[np.ndarray, np.ndarray]:
  """Token-id lists -> LEFT-padded (input_ids_BT int32, attention_mask_BT bool); T rounded up to `multiple`."""
  if not len(prompts):
    raise ValueError("input_ids_BT is an empty list of prompts")
  empty = [i for i, p in enumerate(prompts) if not len(p)]
  if empty:
    raise ValueError(f"prompts {empty} of input_ids_BT are empty; every prompt needs at least one token")
  width = -(-max(len(p) for p in prompts) // multiple) * multiple
  ids_BT = np.full((len(prompts), width), pad_token_id, np.int32)
  mask_BT = np.zeros((len(prompts), width), bool)
  for i, p in enumerate(prompts):
    ids_BT[i, width - len(p) :] = np.asarray(p, np.int64)
    mask_BT[i, width - len(p) :] = True
  return ids_BT, mask_BT


def _is_id_lists(x: Any) -> bool:
  return isinstance(x, (list, tuple)) and all(isinstance(p, (list, tuple, np.ndarray)) for p in x)


def generate(
    model: Transformer,
    params: Any,
    input_ids_BT: Any,
    attention_mask_BT: Any = None,
    *,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    rng: Array | None = None,
    seed: int | None = None,
    eos_id: int | Sequence[int] | None = None,
    pad_id: int | None = None,
) -> GenerateOutput | list[np.ndarray]:
  """Generate up to `max_new_tokens` per row from LEFT-padded prompts.

  temperature=0.0 is greedy (argmax); otherwise samples from softmax(logits / temperature) restricted to the
  top_k tokens (0 = all) and the top_p nucleus (1.0 = all); sampling needs `rng` (or `seed`).
  Returns GenerateOutput(tokens_BN [B, max_new_tokens] int32 (pad_token_id after EOS), lengths_B).

  `input_ids_BT` may also be a list of token-id lists (left-padded here to a multiple of 16, no mask needed);
  then the result is a list of int32 numpy arrays, each prompt's new tokens up to and including its EOS.
  `seed` (rng = PRNGKey(seed)), `eos_id` and `pad_id` are aliases (experiments.sorry_bench uses them);
  eos/pad default to the model config's ids.
  """
  config = model.config
  eos, pad_token_id = _special_ids(config, eos_token_id if eos_token_id is not None else eos_id, pad_token_id, pad_id)
  ids, mask, as_lists = _prompts(input_ids_BT, attention_mask_BT, pad_token_id, config.vocab_size)
  max_new_tokens, sample, rng = _sampling(max_new_tokens, temperature, top_p, top_k, rng, seed)
  params = params.get("params", params) if isinstance(params, dict) else params
  fn = _compiled(config, max_new_tokens, sample, top_k, top_p < 1.0)
  tokens, lengths = fn(
      params,
      jnp.asarray(ids, jnp.int32),
      jnp.asarray(mask),
      rng,
      jnp.float32(temperature if sample else 1.0),
      jnp.float32(top_p),
      jnp.asarray(eos, jnp.int32),
      jnp.int32(pad_token_id),
  )
  if as_lists:
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    return [tokens[i, : lengths[i]] for i in range(tokens.shape[0])]
  return GenerateOutput(tokens_BN=tokens, lengths_B=lengths)


def _special_ids(config: ModelConfig, eos_token_id: Any, pad_token_id: Any, pad_id: Any) -> tuple[np.ndarray, int]:
  """(EOS ids, pad id) of `generate`: the given ones or the model config's (pad falls back to the first EOS)."""
  if eos_token_id is None:
    eos_token_id = config.eos_token_ids or None
  if pad_token_id is None:
    pad_token_id = pad_id if pad_id is not None else config.pad_token_id
  if eos_token_id is None:
    raise ValueError("generate needs eos_token_id (an id or a list of ids); the model config has none")
  eos = np.asarray([eos_token_id] if np.isscalar(eos_token_id) else list(eos_token_id), np.int64)
  if eos.size == 0:
    raise ValueError("eos_token_id must be an id or a non-empty list of ids")
  if pad_token_id is None:
    pad_token_id = int(eos[0])
  for name, vals in (("eos_token_id", eos), ("pad_token_id", np.asarray([pad_token_id]))):
    if vals.min() < 0 or vals.max() >= config.vocab_size:
      raise ValueError(f"{name} {vals.tolist()} outside the vocabulary [0, {config.vocab_size})")
  return eos, pad_token_id


def _prompts(input_ids_BT: Any, attention_mask_BT: Any, pad_token_id: int, vocab_size: int) -> tuple[Any, Any, bool]:
  """(ids [B, T], mask [B, T] bool, given as lists) of `generate`'s prompts, checked: left padding, ids in the
  vocabulary; a list of token-id lists is left-padded here to a multiple of 16."""
  as_lists = _is_id_lists(input_ids_BT)
  if as_lists:
    if attention_mask_BT is not None:
      raise ValueError("attention_mask_BT must be None when input_ids_BT is a list of token-id lists")
    input_ids_BT, attention_mask_BT = left_pad(input_ids_BT, int(pad_token_id), multiple=16)
  elif attention_mask_BT is None:
    attention_mask_BT = np.ones(np.shape(input_ids_BT), bool)
  ids = np.asarray(input_ids_BT)
  mask = np.asarray(attention_mask_BT).astype(bool)
  if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"input_ids_BT must be an integer [batch, seq] array, got shape {ids.shape} dtype {ids.dtype}")
  if mask.shape != ids.shape:
    raise ValueError(f"attention_mask_BT shape {mask.shape} must equal input_ids_BT shape {ids.shape}")
  if not mask[:, -1].all():
    rows = np.nonzero(~mask[:, -1])[0].tolist()
    raise ValueError(f"generate needs LEFT padding: rows {rows} of attention_mask_BT end with padding")
  real = ids[mask]
  if real.min() < 0 or real.max() >= vocab_size:
    raise ValueError(f"input_ids_BT values must lie in [0, {vocab_size}), got min {real.min()} max {real.max()}")
  return ids, mask, as_lists


def _sampling(
    max_new_tokens: Any, temperature: float, top_p: float, top_k: Any, rng: Array | None, seed: int | None
) -> tuple[int, bool, Array]:
  """(max_new_tokens, sample, rng) of `generate`, checked; rng from `seed` when given, a fixed key when greedy."""
  if rng is None and seed is not None:
    rng = jax.random.PRNGKey(int(seed))
  if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) or max_new_tokens <= 0:
    raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")
  if not isinstance(top_k, int) or top_k < 0:
    raise ValueError(f"top_k must be an int >= 0, got {top_k!r}")
  sample = temperature > 0.0
  if sample and rng is None:
    raise ValueError("sampling (temperature > 0) needs an `rng` key (or a `seed`)")
  if rng is None:
    rng = jax.random.PRNGKey(0)
  return int(max_new_tokens), sample, rng
