"""Tests of displacement_jax.models.tiny: the offline tokenizer and the tiny HF config dicts."""

from __future__ import annotations

import pytest
import transformers

from displacement_jax.models import tiny

TEXTS = (
    "Hello, wörld! 你好 \t tabs\nnew lines  double  spaces",
    "The ends justify the means?",
    "Zebras quizzically vex jumpy wolves: 12345 * 3.14 = ~38780 €",
    "",
)


@pytest.fixture(scope="module")
def tok():
  return tiny.build_tiny_tokenizer()


def test_special_tokens(tok):
  assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (tiny.PAD_ID, tiny.BOS_ID, tiny.EOS_ID) == (0, 1, 2)
  assert tok.unk_token_id is None
  assert tok("Hi")["input_ids"][0] == tiny.BOS_ID  # BOS prepended like Llama
  assert tok("Hi", add_special_tokens=False)["input_ids"][0] != tiny.BOS_ID
  assert 300 <= len(tok) <= tiny.TINY_VOCAB_SIZE
  for t in tiny.ROLE_TOKENS:  # role markers are single special tokens
    assert tok(t, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(t)]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_any_text(tok, text):
  ids = tok(text, add_special_tokens=False)["input_ids"]
  assert all(0 <= i < len(tok) for i in ids)
  assert tok.decode(ids) == text


def test_single_token_words(tok):
  vocab = tok.get_vocab()
  for w in tiny.SINGLE_TOKEN_WORDS:
    assert tok.convert_tokens_to_ids(w) == vocab[w]
    assert tok(w, add_special_tokens=False)["input_ids"] == [vocab[w]]
    assert tok(" " + w, add_special_tokens=False)["input_ids"] == [vocab["Ġ" + w]]
    assert vocab[w] != vocab["Ġ" + w]


def test_extra_words_and_determinism():
  t1 = tiny.build_tiny_tokenizer(extra_words=("Displacement",))
  assert t1("Displacement", add_special_tokens=False)["input_ids"] == [t1.convert_tokens_to_ids("Displacement")]
  tiny._tokenizer_json.cache_clear()  # retrain from scratch: same tokenizer
  t2 = tiny.build_tiny_tokenizer(extra_words=("Displacement",))
  assert t1.backend_tokenizer.to_str() == t2.backend_tokenizer.to_str()
  with pytest.raises(ValueError, match="extra_words"):
    tiny.build_tiny_tokenizer(extra_words=("two words",))
  with pytest.raises(ValueError, match="extra_words"):
    tiny.build_tiny_tokenizer(extra_words="Yes")


def test_save_and_chat_template(tok, tmp_path):
  tiny.build_tiny_tokenizer(tmp_path)
  loaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  for text in TEXTS:
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
  msgs = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi there"}]
  text = loaded.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
  assert text == "<s><|system|>\nBe kind.</s>\n<|user|>\nHi there</s>\n<|assistant|>\n"
  ids = tok(text, add_special_tokens=False)["input_ids"]
  assert ids[:2] == [tiny.BOS_ID, tok.convert_tokens_to_ids("<|system|>")]
  assert ids[-2:] == [tok.convert_tokens_to_ids("<|assistant|>"), tok.convert_tokens_to_ids("Ċ")]


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_tiny_hf_config_loads_in_transformers(family):
  cfg = tiny.tiny_hf_config(family, 512, max_position_embeddings=256)
  hf = transformers.CONFIG_MAPPING[cfg["model_type"]](**cfg)  # HF's own config class accepts every key
  assert hf.architectures == cfg["architectures"]
  for key in (
      "vocab_size",
      "hidden_size",
      "intermediate_size",
      "num_hidden_layers",
      "num_attention_heads",
      "num_key_value_heads",
      "tie_word_embeddings",
      "bos_token_id",
      "eos_token_id",
      "pad_token_id",
  ):
    assert getattr(hf, key) == cfg[key], key
  assert (cfg["vocab_size"], cfg["max_position_embeddings"], cfg["num_hidden_layers"], cfg["hidden_size"]) == (
      512,
      256,
      2,
      64,
  )
  assert cfg["num_attention_heads"] % cfg["num_key_value_heads"] == 0
  if family == "gemma":
    assert (hf.head_dim, hf.hidden_activation, hf.tie_word_embeddings) == (32, "gelu_pytorch_tanh", True)
  if family == "llama31":
    assert hf.rope_parameters["rope_type"] == "llama3"


def test_tiny_hf_config_model_config_and_errors():
  from displacement_jax.models import config as model_config  # pylint: disable=g-import-not-at-top

  for family in tiny.FAMILIES:
    mc = model_config.ModelConfig.from_hf(tiny.tiny_hf_config(family))
    assert (mc.vocab_size, mc.hidden_size, mc.num_layers) == (tiny.TINY_VOCAB_SIZE, 64, 2)
  with pytest.raises(ValueError, match="unknown family"):
    tiny.tiny_hf_config("gpt2")
  with pytest.raises(ValueError, match="vocab_size"):
    tiny.tiny_hf_config("llama", 0)
