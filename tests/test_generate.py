"""generate(): greedy equals HF `generate` token for token (left padding, EOS stop); sampling filters."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from displacement_jax import generate as gen
from displacement_jax.models import convert
from displacement_jax.models.config import ModelConfig
from displacement_jax.models.transformer import Transformer
from tests import hf_tiny

PAD = hf_tiny.PAD_ID
NEW = 6


@functools.lru_cache(maxsize=None)
def _setup(family: str):
  model = hf_tiny.build_tiny_hf_torch_model(family, seed=5)
  config = ModelConfig.from_hf(model.config.to_dict())
  params = convert.state_dict_to_params({k: v.detach().numpy() for k, v in model.state_dict().items()}, config)
  rng = np.random.default_rng(1)
  ids = rng.integers(3, 300, size=(3, 7)).astype(np.int32)
  mask = np.ones_like(ids, bool)
  mask[0, :3] = False  # left padding
  mask[1, :1] = False
  ids[~mask] = PAD
  return model, config, params, ids, mask


def _hf_generate(model, ids, mask, eos):
  with torch.no_grad():
    out = model.generate(
        input_ids=torch.from_numpy(ids).long(),
        attention_mask=torch.from_numpy(mask.astype(np.int64)),
        max_new_tokens=NEW,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=PAD,
    )
  new = out[:, ids.shape[1] :].numpy()
  return np.pad(new, ((0, 0), (0, NEW - new.shape[1])), constant_values=PAD)


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_greedy_matches_hf_generate_with_eos_stop(family):
  model, config, params, ids, mask = _setup(family)
  never = config.vocab_size - 1
  first = gen.generate(Transformer(config), params, ids, mask, max_new_tokens=NEW, eos_token_id=never, pad_token_id=PAD)
  first_tokens = np.asarray(first.tokens_BN)
  if (first_tokens == never).any():
    raise AssertionError("the 'never' EOS token was generated; pick another")
  np.testing.assert_array_equal(first_tokens, _hf_generate(model, ids, mask, never))
  np.testing.assert_array_equal(np.asarray(first.lengths_B), [NEW] * 3)
  # Make the token row 0 emits at step 2 the EOS: row 0 stops at its first occurrence, padded after.
  eos = int(first_tokens[0, 2])
  out = gen.generate(
      Transformer(config), {"params": params}, ids, mask, max_new_tokens=NEW, eos_token_id=[eos], pad_token_id=PAD
  )
  tokens = np.asarray(out.tokens_BN)
  np.testing.assert_array_equal(tokens, _hf_generate(model, ids, mask, eos))
  k = int(np.argmax(first_tokens[0] == eos))  # first time row 0 emits it (<= 2)
  assert k <= 2 and tokens[0, k] == eos and (tokens[0, k + 1 :] == PAD).all()
  expected_len = [int(np.argmax(r == eos)) + 1 if (r == eos).any() else NEW for r in first_tokens]
  np.testing.assert_array_equal(np.asarray(out.lengths_B), expected_len)


def test_sampling_top_k_1_equals_greedy_and_runs():
  _, config, params, ids, mask = _setup("llama")
  model = Transformer(config)
  kw = dict(max_new_tokens=NEW, eos_token_id=config.vocab_size - 1, pad_token_id=PAD)
  greedy = np.asarray(gen.generate(model, params, ids, mask, **kw).tokens_BN)
  k1 = gen.generate(model, params, ids, mask, temperature=0.7, top_k=1, rng=jax.random.PRNGKey(3), **kw)
  np.testing.assert_array_equal(np.asarray(k1.tokens_BN), greedy)
  s1 = gen.generate(model, params, ids, mask, temperature=1.0, top_p=0.9, top_k=50, rng=jax.random.PRNGKey(0), **kw)
  s2 = gen.generate(model, params, ids, mask, temperature=1.0, top_p=0.9, top_k=50, rng=jax.random.PRNGKey(0), **kw)
  toks = np.asarray(s1.tokens_BN)
  np.testing.assert_array_equal(toks, np.asarray(s2.tokens_BN))  # same key, same sample
  assert toks.shape == (3, NEW) and toks.min() >= 0 and toks.max() < config.vocab_size


def test_filter_logits_hand_computed():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  # top_p=0.7: nucleus {0.5, 0.3} (mass before 0.3 is 0.5 < 0.7, before 0.15 is 0.8 >= 0.7).
  out = np.asarray(gen.filter_logits(logits, temperature=1.0, top_p=0.7))
  assert np.isfinite(out[0, :2]).all() and np.isneginf(out[0, 2:]).all()
  out = np.asarray(gen.filter_logits(logits, temperature=2.0, top_k=3))
  np.testing.assert_allclose(out[0, :3], np.log([0.5, 0.3, 0.15]) / 2.0, rtol=1e-6)
  assert np.isneginf(out[0, 3])
  out = np.asarray(gen.filter_logits(logits, temperature=1.0, top_p=0.01))  # always keeps the argmax
  assert np.isfinite(out[0, 0]) and np.isneginf(out[0, 1:]).all()


def test_bad_arguments_raise():
  _, config, params, ids, mask = _setup("llama")
  model = Transformer(config)
  right = np.ones_like(mask)
  right[0, -2:] = False
  with pytest.raises(ValueError, match=r"LEFT padding: rows \[0\]"):
    gen.generate(model, params, ids, right, max_new_tokens=2, eos_token_id=2, pad_token_id=PAD)
  with pytest.raises(ValueError, match="needs an `rng`"):
    gen.generate(model, params, ids, mask, max_new_tokens=2, eos_token_id=2, pad_token_id=PAD, temperature=1.0)
  with pytest.raises(ValueError, match="top_p must be in"):
    gen.generate(model, params, ids, mask, max_new_tokens=2, eos_token_id=2, pad_token_id=PAD, top_p=0.0)


def test_list_of_lists_input_and_sorry_bench_backend():
  """Token-id lists are left-padded inside generate; results equal the array path (and HF) row by row."""
  from displacement_jax.experiments.sorry_bench import generation

  hf_model, config, params, ids, mask = _setup("llama")
  model = Transformer(config)
  prompts = [list(r[m]) for r, m in zip(ids, mask)]  # lengths 4, 6, 7
  eos = int(
      np.asarray(
          gen.generate(
              model, params, ids, mask, max_new_tokens=NEW, eos_token_id=config.vocab_size - 1, pad_token_id=PAD
          ).tokens_BN
      )[1, 1]
  )
  ref = gen.generate(model, params, ids, mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=PAD)
  ref_tokens, ref_lengths = np.asarray(ref.tokens_BN), np.asarray(ref.lengths_B)
  np.testing.assert_array_equal(ref_tokens, _hf_generate(hf_model, ids, mask, eos))
  rows = gen.generate(model, params, prompts, max_new_tokens=NEW, eos_id=eos, pad_id=PAD, temperature=0.0, seed=0)
  assert len(rows) == 3
  for b, row in enumerate(rows):
    np.testing.assert_array_equal(row, ref_tokens[b, : ref_lengths[b]])
  assert rows[1][-1] == eos and len(rows[1]) <= 2
  # experiments.sorry_bench.generation's default backend calls generate exactly this way and strips EOS.
  got = generation.generate_sample_fn(
      model, params, prompts, max_new_tokens=NEW, temperature=0.0, seed=0, eos_id=eos, pad_id=PAD
  )
  assert got == [generation.strip_after_eos(list(r), eos) for r in rows]
  assert eos not in got[1]
  with pytest.raises(ValueError, match=r"prompts \[1\] of input_ids_BT are empty"):
    gen.generate(model, params, [[5, 6], []], max_new_tokens=2, eos_token_id=2, pad_token_id=PAD)
  with pytest.raises(ValueError, match=r"input_ids_BT values must lie in \[0, 300\)"):
    gen.generate(model, params, [[5, 999]], max_new_tokens=2, eos_token_id=2, pad_token_id=PAD)


def test_top_p_one_keeps_the_whole_distribution():
  """A Python top_p=1.0 skips the nucleus sort and leaves every logit (/ temperature), tail included; a traced
  top_p<1 still cuts the tail and keeps the head."""
  logits_BV = jnp.asarray(np.random.default_rng(0).normal(size=(3, 50)) * 4, jnp.float32)
  np.testing.assert_array_equal(gen.filter_logits(logits_BV, temperature=2.0, top_p=1.0), logits_BV / 2.0)
  cut = gen.filter_logits(logits_BV, temperature=1.0, top_p=jnp.float32(0.5))
  assert np.isinf(np.asarray(cut)).any(axis=-1).all() and np.isfinite(np.asarray(cut)).any(axis=-1).all()
