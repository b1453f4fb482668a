"""Sampling responses: prompts -> decoded completions, in batches, through a token-level backend."""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from displacement_jax import generate as gen_lib
from displacement_jax.data import tokenize
from displacement_jax.data.layout import pad_id_of


class Generator(Protocol):
  """Prompts -> decoded completions (the policy, or the judge over judge prompts)."""

  def __call__(self, prompts: Sequence[Any], *, temperature: float, max_new_tokens: int, seed: int) -> list[str]:
    ...


class SampleFn(Protocol):
  """Token-level generation backend: new token ids (EOS and after removed) for each prompt."""

  def __call__(
      self,
      model: Any,
      params: Any,
      prompt_ids: Sequence[Sequence[int]],
      *,
      max_new_tokens: int,
      temperature: float,
      seed: int,
      eos_id: int,
      pad_id: int,
  ) -> list[list[int]]:
    ...


def strip_after_eos(ids: Sequence[int], eos_id: int) -> list[int]:
  """Token ids up to (not including) the first EOS."""
  ids = [int(t) for t in ids]
  return ids[: ids.index(eos_id)] if eos_id in ids else ids


def generate_sample_fn(
    model: Any,
    params: Any,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    eos_id: int,
    pad_id: int,
) -> list[list[int]]:
  """The default backend: `displacement_jax.generate.generate` (KV cache; greedy when temperature == 0).

  Prompts are LEFT-padded to a multiple of 64 tokens so a few compiled shapes serve every batch.
  """
  if not prompt_ids:
    return []
  ids, mask = gen_lib.left_pad(prompt_ids, pad_id, multiple=64)
  out = gen_lib.generate(
      model,
      params,
      ids,
      mask,
      max_new_tokens=int(max_new_tokens),
      eos_token_id=eos_id,
      pad_token_id=pad_id,
      temperature=float(temperature),
      rng=jax.random.PRNGKey(int(seed)),
  )
  return [strip_after_eos(row, eos_id) for row in np.asarray(out.tokens_BN)]


def make_generator(
    model: Any,
    params: Any,
    tokenizer: Any,
    *,
    data_format: str,
    batch_size: int,
    max_length: int,
    progress: bool = False,
    desc: str = "generate",
    sample_fn: SampleFn | None = None,
) -> Generator:
  """A `Generator`: prompts -> decoded completions, in batches, through `sample_fn` (default: generate).

  Prompts are formatted exactly as in training (`data.tokenize.prompt_ids` with `data_format`: a user
  request becomes a one-turn chat under 'chat_template'); long prompts keep their last tokens.
  """

  sample_fn = sample_fn or generate_sample_fn
  eos_id = int(tokenizer.eos_token_id)
  pad_id = pad_id_of(tokenizer, eos_id)

  def encode(prompt: Any) -> list[int]:
    return list(tokenize.prompt_ids(tokenizer, prompt, format=data_format))

  def generator(prompts: Sequence[Any], *, temperature: float, max_new_tokens: int, seed: int) -> list[str]:
    out: list[str] = []
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, dynamic_ncols=True)
    for start in range(0, len(prompts), batch_size):
      chunk = [encode(p)[-(max_length - max_new_tokens) :] for p in prompts[start : start + batch_size]]
      new_ids = sample_fn(
          model,
          params,
          chunk,
          max_new_tokens=max_new_tokens,
          temperature=temperature,
          seed=seed + start,
          eos_id=eos_id,
          pad_id=pad_id,
      )
      out.extend(tokenizer.decode(ids, skip_special_tokens=True) for ids in new_ids)
      bar.update(len(chunk))
    bar.close()
    return out

  return generator


def sample_pairs(
    generator: Any, prompts: list[str], *, temperature: float, max_new_tokens: int, seed: int, max_tries: int
) -> tuple[list[dict[str, Any]], int]:
  """(pairs with distinct non-empty responses, number of prompts left out): two samples per prompt, redrawn with
  new seeds where they came out equal or empty."""
  chosen = generator(prompts, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
  rejected = generator(prompts, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed + 1_000_003)
  for attempt in range(1, max_tries):
    bad = [
        i for i, (a, b) in enumerate(zip(chosen, rejected)) if a.strip() == b.strip() or not a.strip() or not b.strip()
    ]
    if not bad:
      break
    redo = generator(
        [prompts[i] for i in bad], temperature=temperature, max_new_tokens=max_new_tokens, seed=seed + 7919 * attempt
    )
    for i, text in zip(bad, redo):
      (rejected if chosen[i].strip() else chosen)[i] = text
  pairs, left_out = [], 0
  for i, (prompt, a, b) in enumerate(zip(prompts, chosen, rejected)):
    if a.strip() == b.strip() or not a.strip() or not b.strip():
      left_out += 1
      continue
    pairs.append({"index": i, "prompt": prompt, "chosen": a, "rejected": b})
  return pairs, left_out
