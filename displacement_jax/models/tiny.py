"""Offline tiny fixtures: a byte-level BPE tokenizer and HF config.json dicts of tiny models (no torch).

`build_tiny_tokenizer()` trains a byte-level BPE (the `tokenizers` library) on a small embedded English
corpus: any text tokenizes without unknowns and decodes back exactly; the single-token-mode words
(`SINGLE_TOKEN_WORDS`: "Yes", "No", ...) are single vocabulary entries both bare ("Yes") and after a space
("ĠYes"). Special tokens: <pad>=0, <s>=1 (BOS, prepended like Llama), </s>=2 (EOS), then the chat role
tokens. The jinja chat template makes `apply_chat_template` work offline. Deterministic.

`tiny_hf_config(family)` gives HF config.json-style dicts (2 layers, hidden 64, 4 heads, 2 kv heads) for the
families llama, llama31 (Llama-3.1 rope scaling), mistral, qwen2, olmo, gemma.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Sequence

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<s>", "</s>"
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|prompter|>")
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN) + ROLE_TOKENS
SINGLE_TOKEN_WORDS = ("Yes", "No", "Never", "Maybe", "Perhaps", "Yeah", "Sure", "Certainly", "Absolutely")
TINY_VOCAB_SIZE = 512
FAMILIES = ("llama", "llama31", "mistral", "qwen2", "olmo", "gemma")

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }}\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}\n{% endif %}"
)

_CORPUS = """\
Is the following statement something you would say? The ends justify the means.
It is acceptable to break a few rules if the final result is good for everyone.
I would never lie to the people I work with, even when the truth is hard to hear.
Please answer the question below with a short and honest answer.
The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.
Write a story about a small robot that learns to paint pictures of the sea.
What is the capital of France? The capital of France is Paris, a city on the Seine.
Explain how a neural network learns from data by following the gradient of a loss.
The model assigns a probability to every token in the vocabulary at each position.
Direct preference optimization increases the log probability of the chosen response
and decreases the log probability of the rejected response relative to a reference model.
Sometimes both probabilities go down, and the probability mass moves to other responses.
This is called likelihood displacement, and it can make a safe model unsafe.
I am sorry, but I cannot help with that request because it could cause harm.
Here is a simple recipe for bread: mix flour, water, salt and yeast, then bake for an hour.
They said that the weather would be warm and sunny for the rest of the week.
You should always check your work twice before you hand it in to the teacher.
We can compute the similarity of two responses from their hidden representations.
Thank you for your help! Could you tell me more about the history of this place?
One, two, three, four, five, six, seven, eight, nine, ten. 0 1 2 3 4 5 6 7 8 9 100 2024.
"""


def _training_corpus(words: Sequence[str]) -> list[str]:
  """Embedded corpus plus each must-be-single word repeated bare and after a space."""
  lines = _CORPUS.splitlines()
  for w in words:
    lines += [w] * 64 + [f"{w}, {w}. {w}! {w}?"] * 64 + [f"I say {w} to this."] * 16
  return lines


def _check_word(word: str) -> str:
  if not isinstance(word, str) or not word or any(c.isspace() for c in word):
    raise ValueError(
        f"build_tiny_tokenizer: extra_words entries must be non-empty strings without whitespace, " f"got {word!r}"
    )
  return word


@functools.lru_cache(maxsize=8)
def _tokenizer_json(extra_words: tuple[str, ...], vocab_size: int) -> str:
  """The trained tokenizer as a tokenizer.json string (cached: training is deterministic)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # pylint: disable=g-import-not-at-top

  words = tuple(dict.fromkeys(SINGLE_TOKEN_WORDS + extra_words))
  tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size,
      min_frequency=2,
      show_progress=False,
      special_tokens=list(SPECIAL_TOKENS),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(_training_corpus(words), trainer=trainer)
  tok.post_processor = processors.TemplateProcessing(
      single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, BOS_ID)]
  )
  vocab = tok.get_vocab()
  for i, t in enumerate(SPECIAL_TOKENS):
    assert vocab[t] == i, (t, vocab[t])
  missing = [w for w in words if w not in vocab or "Ġ" + w not in vocab]
  if missing:
    raise ValueError(
        f"build_tiny_tokenizer: vocab_size={vocab_size} is too small to keep {missing} as single "
        "tokens; use fewer extra_words or a larger vocab_size"
    )
  return tok.to_str()


def build_tiny_tokenizer(
    out_dir: str | os.PathLike[str] | None = None, *, extra_words: Sequence[str] = (), vocab_size: int = TINY_VOCAB_SIZE
) -> Any:
  """A deterministic byte-level BPE `PreTrainedTokenizerFast` (<= vocab_size entries) built offline.

  extra_words: more words (no whitespace) that must be single vocabulary entries, like SINGLE_TOKEN_WORDS.
  out_dir: if given, `save_pretrained` there, so `AutoTokenizer.from_pretrained(out_dir)` works offline.
  """
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
  from transformers import PreTrainedTokenizerFast  # pylint: disable=g-import-not-at-top

  if isinstance(extra_words, str):
    raise ValueError(f"build_tiny_tokenizer: extra_words must be a sequence of words, got the string {extra_words!r}")
  if int(vocab_size) < 300:
    raise ValueError(f"build_tiny_tokenizer: vocab_size must be >= 300 (bytes + specials + words), got {vocab_size}")
  extra = tuple(_check_word(w) for w in extra_words)
  tok = PreTrainedTokenizerFast(
      tokenizer_object=Tokenizer.from_str(_tokenizer_json(extra, int(vocab_size))),
      bos_token=BOS_TOKEN,
      eos_token=EOS_TOKEN,
      pad_token=PAD_TOKEN,
      additional_special_tokens=list(ROLE_TOKENS),
      padding_side="right",
      clean_up_tokenization_spaces=False,
      model_max_length=4096,
  )
  tok.chat_template = CHAT_TEMPLATE
  if out_dir is not None:
    os.makedirs(out_dir, exist_ok=True)
    tok.save_pretrained(str(out_dir))
  return tok


def tiny_hf_config(family: str, vocab_size: int = TINY_VOCAB_SIZE, **overrides: Any) -> dict[str, Any]:
  """HF config.json dict of a tiny (2 layers, d=64, 4 heads, 2 kv heads, ffn 128) model of `family`.

  Families: llama (Llama-3 style, rope theta 5e5), llama31 (Llama-3.1 "llama3" rope scaling), mistral
  (v0.2, no sliding window), qwen2 (qkv bias), olmo (OLMo-1, non-parametric LayerNorm, tied), gemma
  (Gemma-1: (1+w) RMSNorm, GeGLU tanh, head_dim 32 != d/h, one kv head, tied). Special ids match
  `build_tiny_tokenizer` (pad 0, bos 1, eos 2). `overrides` replace or add any key.
  """
  if family not in FAMILIES:
    raise ValueError(f"tiny_hf_config: unknown family {family!r}; expected one of {FAMILIES}")
  if not isinstance(vocab_size, int) or vocab_size <= EOS_ID:
    raise ValueError(f"tiny_hf_config: vocab_size must be an int > {EOS_ID}, got {vocab_size!r}")
  cfg: dict[str, Any] = dict(
      vocab_size=vocab_size,
      hidden_size=64,
      intermediate_size=128,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      head_dim=16,
      max_position_embeddings=512,
      rms_norm_eps=1e-5,
      rope_theta=10000.0,
      rope_scaling=None,
      hidden_act="silu",
      attention_bias=False,
      tie_word_embeddings=False,
      initializer_range=0.02,
      bos_token_id=BOS_ID,
      eos_token_id=EOS_ID,
      pad_token_id=PAD_ID,
      torch_dtype="float32",
      use_cache=True,
  )
  if family == "llama":
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"], rope_theta=500000.0, mlp_bias=False)
  elif family == "llama31":
    cfg.update(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        rope_theta=500000.0,
        mlp_bias=False,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )
  elif family == "mistral":
    cfg.update(model_type="mistral", architectures=["MistralForCausalLM"], rope_theta=1e6, sliding_window=None)
  elif family == "qwen2":
    cfg.update(
        model_type="qwen2",
        architectures=["Qwen2ForCausalLM"],
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        use_sliding_window=False,
        sliding_window=None,
        max_window_layers=2,
    )
  elif family == "olmo":
    cfg.update(model_type="olmo", architectures=["OlmoForCausalLM"], tie_word_embeddings=True, clip_qkv=None)
    cfg.pop("rms_norm_eps")
  elif family == "gemma":
    cfg.update(
        model_type="gemma",
        architectures=["GemmaForCausalLM"],
        num_key_value_heads=1,
        head_dim=32,
        hidden_act="gelu_pytorch_tanh",
        hidden_activation="gelu_pytorch_tanh",
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    )
  cfg.update(overrides)
  return cfg
