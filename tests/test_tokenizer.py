"""Tokenizers: offline loading, seeded order-independent special-token init + resize, chat template ids."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from displacement_jax.models import convert
from displacement_jax.models.config import ModelConfig
from displacement_jax.models.tokenizer import (
    add_special_tokens_and_resize,
    apply_chat_template_ids,
    load_tokenizer,
    token_normal,
)
from displacement_jax.models.transformer import Transformer
from displacement_jax.models import tiny

WORDS = ["<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(37)]  # 40 entries, no pad, no role tokens
NEW = ("<|prompter|>", "<|assistant|>")


@pytest.fixture(scope="module")
def word_tok_dir(tmp_path_factory):
  """A WordLevel tokenizer (tokenizers lib) saved with save_pretrained: 40 tokens, no pad token."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
  raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
  out = str(tmp_path_factory.mktemp("word_tok"))
  tok.save_pretrained(out)
  return out


def _config(vocab: int, tied: bool) -> ModelConfig:
  return ModelConfig(
      model_type="llama",
      vocab_size=vocab,
      hidden_size=16,
      intermediate_size=32,
      num_layers=1,
      num_heads=2,
      num_kv_heads=1,
      head_dim=8,
      tie_word_embeddings=tied,
      max_position_embeddings=32,
  )


def _random_params(config: ModelConfig, seed: int = 0):
  rng = np.random.default_rng(seed)
  shapes = convert.expected_param_shapes(config)
  return jax.tree_util.tree_map(
      lambda s: (rng.standard_normal(s) * 0.5 + 0.1).astype(np.float32), shapes, is_leaf=lambda x: isinstance(x, tuple)
  )


def test_load_tokenizer_offline_dir(word_tok_dir):
  tok = load_tokenizer(word_tok_dir)
  assert len(tok) == 40 and tok.pad_token is None
  assert tok("w3 w5", add_special_tokens=False).input_ids == [6, 8]


def test_load_tokenizer_offline_unknown_hub_id(monkeypatch):
  import huggingface_hub

  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(ValueError, match=r"'displacement-jax-test/no-such-tokenizer' is not a local directory"):
    load_tokenizer("displacement-jax-test/no-such-tokenizer")


def test_resize_rows_match_formula_and_are_reproducible(word_tok_dir):
  config = _config(40, tied=False)
  params = _random_params(config)
  tok_a, params_a, config_a = add_special_tokens_and_resize(load_tokenizer(word_tok_dir), params, config, seed=7)
  # Independent second load, tokens in the other order.
  tok_b, params_b, config_b = add_special_tokens_and_resize(
      load_tokenizer(word_tok_dir), _random_params(config), config, tokens=NEW[::-1], seed=7
  )
  assert len(tok_a) == len(tok_b) == 43 and config_a.vocab_size == config_b.vocab_size == 43
  assert tok_a.pad_token == "<|pad|>" and config_a.pad_token_id == tok_a.pad_token_id == tok_a.convert_tokens_to_ids(
      "<|pad|>"
  )
  assert tok_a.convert_tokens_to_ids("<|prompter|>") != tok_b.convert_tokens_to_ids("<|prompter|>")  # order differs
  emb, head = params["embed_tokens"]["embedding"], params["lm_head"]["kernel"]
  emb_a, head_a = np.asarray(params_a["embed_tokens"]["embedding"]), np.asarray(params_a["lm_head"]["kernel"])
  emb_b, head_b = np.asarray(params_b["embed_tokens"]["embedding"]), np.asarray(params_b["lm_head"]["kernel"])
  assert emb_a.shape == (43, 16) and head_a.shape == (16, 43)
  np.testing.assert_array_equal(emb_a[:40], emb)  # existing rows unchanged
  np.testing.assert_array_equal(head_a[:, :40], head)
  for token in NEW + ("<|pad|>",):
    ia, ib = tok_a.convert_tokens_to_ids(token), tok_b.convert_tokens_to_ids(token)
    assert ia >= 40 and ib >= 40
    np.testing.assert_array_equal(emb_a[ia], emb_b[ib])  # same token -> same vector, any order / load
    np.testing.assert_array_equal(head_a[:, ia], head_b[:, ib])
    # The documented formula, in float64 numpy.
    want_emb = emb.mean(0, dtype=np.float64) + emb.std(0, dtype=np.float64) * token_normal(7, "embed_tokens", token, 16)
    want_head = head.mean(1, dtype=np.float64) + head.std(1, dtype=np.float64) * token_normal(7, "lm_head", token, 16)
    np.testing.assert_allclose(emb_a[ia], want_emb, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(head_a[:, ia], want_head, rtol=1e-5, atol=1e-6)
  # Another seed gives other vectors; the inputs were not modified.
  _, params_c, _ = add_special_tokens_and_resize(load_tokenizer(word_tok_dir), params, config, seed=8)
  assert not np.allclose(np.asarray(params_c["embed_tokens"]["embedding"])[40:], emb_a[40:])
  assert params["embed_tokens"]["embedding"].shape == (40, 16) and config.vocab_size == 40


def test_resized_model_keeps_old_logits(word_tok_dir):
  """Tied model: logits over the old vocabulary are unchanged after the resize; the new tokens get logits."""
  config = _config(40, tied=True)
  params = _random_params(config, seed=1)
  tok, new_params, new_config = add_special_tokens_and_resize(load_tokenizer(word_tok_dir), params, config)
  assert "lm_head" not in new_params and new_config.vocab_size == 43
  ids = jnp.asarray([[1, 5, 9, 22, 3]])
  mask = jnp.ones(ids.shape, bool)
  old = Transformer(config).apply({"params": params}, ids, mask).logits_BTV
  new = Transformer(new_config).apply({"params": new_params}, ids, mask).logits_BTV
  assert new.shape == (1, 5, 43)
  np.testing.assert_allclose(np.asarray(new[..., :40]), np.asarray(old), atol=1e-5, rtol=1e-5)
  enc = tok("w1 <|prompter|> w2 <|assistant|>", add_special_tokens=False).input_ids
  assert enc == [4, tok.convert_tokens_to_ids("<|prompter|>"), 5, tok.convert_tokens_to_ids("<|assistant|>")]


def test_existing_tokens_and_padded_vocab():
  """Tokens the tokenizer already has keep their rows; a model vocab larger than the tokenizer is not shrunk."""
  tok = tiny.build_tiny_tokenizer()
  n = len(tok)
  config = _config(n + 8, tied=True)  # padded embedding, like Qwen's
  params = _random_params(config, seed=2)
  tok2, params2, config2 = add_special_tokens_and_resize(
      tok, params, config, tokens=("<|prompter|>", "<|assistant|>", "<|new|>")
  )
  assert len(tok2) == n + 1 and config2.vocab_size == n + 8 and tok2.pad_token == tiny.PAD_TOKEN
  new_id = tok2.convert_tokens_to_ids("<|new|>")
  assert new_id == n
  emb, emb2 = params["embed_tokens"]["embedding"], np.asarray(params2["embed_tokens"]["embedding"])
  keep = np.arange(n + 8) != new_id
  np.testing.assert_array_equal(emb2[keep], emb[keep])
  want = emb.mean(0, dtype=np.float64) + emb.std(0, dtype=np.float64) * token_normal(0, "embed_tokens", "<|new|>", 16)
  np.testing.assert_allclose(emb2[new_id], want, rtol=1e-5, atol=1e-6)
  assert len(tok) == n  # the caller's tokenizer is untouched


def test_bad_arguments(word_tok_dir):
  config = _config(40, tied=True)
  with pytest.raises(ValueError, match=r"embed_tokens/embedding has shape \(41, 16\), expected .* \(40, 16\)"):
    add_special_tokens_and_resize(load_tokenizer(word_tok_dir), _random_params(_config(41, True)), config)
  with pytest.raises(ValueError, match="tokens must be a sequence of strings"):
    add_special_tokens_and_resize(load_tokenizer(word_tok_dir), _random_params(config), config, tokens="<|x|>")


def test_apply_chat_template_ids(word_tok_dir):
  tok = tiny.build_tiny_tokenizer()
  messages = [{"role": "user", "content": "What is the capital of France?"}]
  ids = apply_chat_template_ids(tok, messages, add_generation_prompt=True)
  rendered = "<s><|user|>\nWhat is the capital of France?</s>\n<|assistant|>\n"
  assert ids == tok(rendered, add_special_tokens=False).input_ids
  assert ids[0] == tiny.BOS_ID and ids[-2] == tok.convert_tokens_to_ids("<|assistant|>")
  no_prompt = apply_chat_template_ids(tok, messages, add_generation_prompt=False)
  assert ids[: len(no_prompt)] == no_prompt and len(ids) == len(no_prompt) + 2
  with pytest.raises(ValueError, match="has no chat_template"):
    apply_chat_template_ids(load_tokenizer(word_tok_dir), messages, add_generation_prompt=True)
  with pytest.raises(ValueError, match=r"messages\[0\] must be a dict with 'role' and 'content'"):
    apply_chat_template_ids(tok, [{"text": "hi"}], add_generation_prompt=True)
  json.dumps(ids)  # plain ints
