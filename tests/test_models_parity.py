"""Flax Transformer vs HF PyTorch parity on tiny random models of every supported family (offline, fp32 + bf16)."""

from __future__ import annotations

import functools
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from displacement_jax import logprobs
from displacement_jax.models import convert
from displacement_jax.models.config import ModelConfig
from displacement_jax.models.transformer import Transformer, init_cache, unembedding
from tests import hf_tiny

FAMILIES = hf_tiny.FAMILIES
TOL = 1e-4
# Measured max |logit diff| of bf16 params + bf16 compute vs HF fp32 on these tiny models: 0.024 (gemma)
# to 0.050 (llama), with |logits| up to ~5; the bound leaves 2x headroom.
BF16_LOGIT_TOL = 0.1
PAD = hf_tiny.PAD_ID


def _batch() -> tuple[np.ndarray, np.ndarray]:
  """Row 0 left-padded, row 1 right-padded, row 2 unpadded (covers both padding sides)."""
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 300, size=(3, 10)).astype(np.int32)
  mask = np.ones((3, 10), bool)
  mask[0, :3] = False
  mask[1, 7:] = False
  ids[~mask] = PAD
  return ids, mask


def _hf_run(model, ids, mask):
  pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  with torch.no_grad():
    out = model(
        input_ids=torch.from_numpy(ids).long(),
        attention_mask=torch.from_numpy(mask.astype(np.int64)),
        position_ids=torch.from_numpy(pos).long(),
        output_hidden_states=True,
    )
  return out.logits.float().numpy(), [h.float().numpy() for h in out.hidden_states]


@functools.lru_cache(maxsize=None)
def _case(family: str) -> dict:
  """HF model, our config/params and HF reference outputs for `family` (built once per test session)."""
  model = hf_tiny.build_tiny_hf_torch_model(family, seed=3)
  config = ModelConfig.from_hf(model.config.to_dict())
  sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
  params = convert.state_dict_to_params(sd, config)
  ids, mask = _batch()
  hf_logits, hf_hidden = _hf_run(model, ids, mask)
  return dict(
      family=family,
      model=model,
      config=config,
      params=params,
      ids=ids,
      mask=mask,
      hf_logits=hf_logits,
      hf_hidden=hf_hidden,
  )


@pytest.fixture(scope="module", params=FAMILIES)
def family_case(request):
  return _case(request.param)


def test_fp32_logits_and_hidden_match_hf(family_case):
  c = family_case
  out = Transformer(c["config"]).apply(
      {"params": c["params"]}, c["ids"], c["mask"], return_hidden=True, return_all_hidden=True
  )
  mask = c["mask"]
  assert out.logits_BTV.dtype == jnp.float32
  logit_diff = np.abs(np.asarray(out.logits_BTV) - c["hf_logits"])[mask].max()
  assert logit_diff <= TOL, (c["family"], logit_diff)
  assert len(out.all_hidden) == c["config"].num_layers + 1 == len(c["hf_hidden"])
  for i, (ours, theirs) in enumerate(zip(out.all_hidden, c["hf_hidden"])):
    diff = np.abs(np.asarray(ours) - theirs)[mask].max()
    assert diff <= TOL, (c["family"], i, diff)
  np.testing.assert_array_equal(np.asarray(out.hidden_BTD), np.asarray(out.all_hidden[-1]))
  # Padded query rows must be finite.
  assert np.isfinite(np.asarray(out.logits_BTV)).all()


def test_unembedding_reproduces_logits(family_case):
  c = family_case
  out = Transformer(c["config"]).apply({"params": c["params"]}, c["ids"], c["mask"], return_hidden=True)
  w_DV = unembedding(c["params"], c["config"])
  assert w_DV.shape == (c["config"].hidden_size, c["config"].vocab_size)
  np.testing.assert_allclose(np.asarray(out.hidden_BTD @ w_DV), np.asarray(out.logits_BTV), atol=1e-4)


def test_sequence_logprobs_match_hf(family_case):
  c = family_case
  ids, mask = c["ids"], c["mask"]
  labels = np.zeros_like(ids)
  labels[:, :-1] = ids[:, 1:]
  # (prompt, response) split: positions predicting the last 4 real tokens of each row.
  loss_mask = np.zeros_like(mask)
  for b in range(ids.shape[0]):
    real = np.nonzero(mask[b])[0]
    loss_mask[b, real[-5:-1]] = True
  out = Transformer(c["config"]).apply({"params": c["params"]}, ids, mask)
  ours = np.asarray(logprobs.sequence_logprobs(out.logits_BTV, labels, loss_mask))
  hf_lp = torch.log_softmax(torch.from_numpy(c["hf_logits"]).double(), -1).numpy()
  ref = np.array([sum(hf_lp[b, t, labels[b, t]] for t in np.nonzero(loss_mask[b])[0]) for b in range(ids.shape[0])])
  np.testing.assert_allclose(ours, ref, atol=TOL)


def test_bf16_within_bound(family_case):
  c = family_case
  config = c["config"].replace(dtype="bfloat16", param_dtype="bfloat16")
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), c["params"])
  out = Transformer(config).apply({"params": params}, c["ids"], c["mask"], return_hidden=True)
  assert out.logits_BTV.dtype == jnp.float32 and out.hidden_BTD.dtype == jnp.bfloat16
  diff = np.abs(np.asarray(out.logits_BTV) - c["hf_logits"])[c["mask"]].max()
  assert diff <= BF16_LOGIT_TOL, (c["family"], diff)


@pytest.mark.parametrize("family", ["llama", "gemma", "gemma3"])
def test_kv_cache_prefill_and_decode_match_full_forward(family):
  c = _case(family)
  ids, mask = c["ids"], c["mask"]
  left = np.stack([ids[0], ids[2]]), np.stack([mask[0], mask[2]])  # left-padded batch
  model = Transformer(c["config"])
  full = model.apply({"params": c["params"]}, *left).logits_BTV
  cache = init_cache(c["config"], 2, 12)
  out = model.apply({"params": c["params"]}, left[0][:, :7], left[1][:, :7], cache=cache)
  np.testing.assert_allclose(np.asarray(out.logits_BTV), np.asarray(full[:, :7]), atol=TOL)
  cache = out.cache
  for t in range(7, 10):
    out = model.apply({"params": c["params"]}, left[0][:, t : t + 1], left[1][:, t : t + 1], cache=cache)
    cache = out.cache
    np.testing.assert_allclose(np.asarray(out.logits_BTV[:, 0]), np.asarray(full[:, t]), atol=TOL)
  assert int(cache["index"]) == 10


def test_remat_same_logits():
  c = _case("llama")
  a = Transformer(c["config"]).apply({"params": c["params"]}, c["ids"], c["mask"]).logits_BTV
  b = Transformer(c["config"].replace(remat=True)).apply({"params": c["params"]}, c["ids"], c["mask"]).logits_BTV
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_params_state_dict_round_trip(family_case):
  c = family_case
  sd = convert.params_to_state_dict(c["params"], c["config"])
  hf_sd = {k: v.detach().numpy() for k, v in c["model"].state_dict().items()}
  expected_names = {k for k in hf_sd if convert.hf_name_to_path(k, c["config"]) is not None}
  assert set(sd) == expected_names
  for k, v in sd.items():
    np.testing.assert_array_equal(v, hf_sd[k])
  shapes = jax.tree.map(lambda x: tuple(x.shape), c["params"])
  assert shapes == convert.expected_param_shapes(c["config"])


def test_rope_parameters_and_legacy_keys_agree():
  hf = hf_tiny.build_tiny_hf_torch_model("llama31").config.to_dict()
  new = ModelConfig.from_hf(hf)
  legacy = dict(hf)
  rp = legacy.pop("rope_parameters")
  legacy["rope_theta"] = rp["rope_theta"]
  legacy["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
  old = ModelConfig.from_hf(legacy)
  assert new.rope_type == old.rope_type == "llama3" and new.rope_theta == old.rope_theta == 500000.0
  assert new.rope_scaling == old.rope_scaling
  assert dict(old.rope_scaling)["original_max_position_embeddings"] == 16
  # The scaling actually changes the low frequencies of the tiny model (so the parity test exercises it).
  from displacement_jax.models.transformer import rope_inv_freq

  scaled, plain = rope_inv_freq(new), rope_inv_freq(new.replace(rope_scaling=None))
  np.testing.assert_allclose(scaled[-1], plain[-1] / 8.0, rtol=1e-6)
  # Frequency 1 has wavelength 2*pi in the "medium" band: smooth = (16 / (2 pi) - 1) / (4 - 1) = 0.5155.
  smooth = (16 / (2 * np.pi) - 1) / 3
  np.testing.assert_allclose(scaled[0], (1 - smooth) / 8 + smooth, rtol=1e-6)
  assert ModelConfig.from_hf(new.to_hf()) == new


def test_unsupported_model_type_raises():
  with pytest.raises(ValueError, match="supported model types: llama, mistral, qwen2, olmo, gemma"):
    ModelConfig.from_hf(
        {
            "model_type": "gpt2",
            "vocab_size": 10,
            "hidden_size": 8,
            "intermediate_size": 8,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        }
    )


def test_wrong_param_shape_names_tensor():
  model = hf_tiny.build_tiny_hf_torch_model("qwen2", num_hidden_layers=1)
  config = ModelConfig.from_hf(model.config.to_dict())
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  sd["model.layers.0.self_attn.k_proj.weight"] = np.zeros((5, 64), np.float32)
  with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight.*\(5, 64\)"):
    convert.state_dict_to_params(sd, config)
  del sd["model.layers.0.self_attn.k_proj.weight"]
  with pytest.raises(ValueError, match="missing 1 parameter.*layers_0/self_attn/k_proj/kernel"):
    convert.state_dict_to_params(sd, config)


def test_bad_input_shapes_raise():
  c = _case("llama")
  model = Transformer(c["config"])
  with pytest.raises(ValueError, match="attention_mask_BT shape"):
    model.apply({"params": c["params"]}, c["ids"], c["mask"][:, :5])
  with pytest.raises(ValueError, match=r"input_ids_BT values must lie in \[0, 300\)"):
    model.apply({"params": c["params"]}, c["ids"] + 1000, c["mask"])


def test_mistral_sliding_window_matches_hf():
  model = hf_tiny.build_tiny_hf_torch_model("mistral", seed=4, sliding_window=3)
  config = ModelConfig.from_hf(model.config.to_dict())
  assert config.sliding_window == 3
  params = convert.state_dict_to_params({k: v.detach().numpy() for k, v in model.state_dict().items()}, config)
  ids, mask = _batch()
  hf_logits, _ = _hf_run(model, ids, mask)
  ours = np.asarray(Transformer(config).apply({"params": params}, ids, mask).logits_BTV)
  assert np.abs(ours - hf_logits)[mask].max() <= TOL
  full = np.asarray(Transformer(config.replace(sliding_window=None)).apply({"params": params}, ids, mask).logits_BTV)
  assert np.abs(full - hf_logits)[mask].max() > 1e-2  # the window really changes the result


def test_gemma3_local_layers_and_their_rope_base_matter():
  """The gemma3 tiny case matches HF (above) only with its window and its local RoPE base: each changes the logits."""
  c = _case("gemma3")
  assert c["config"].local_layers == (True, False) and c["config"].rope_local_theta == 1e4
  for changed in (c["config"].replace(sliding_window=64), c["config"].replace(rope_local_theta=1e6)):
    ours = np.asarray(Transformer(changed).apply({"params": c["params"]}, c["ids"], c["mask"]).logits_BTV)
    assert np.abs(ours - c["hf_logits"])[c["mask"]].max() > 1e-2


def test_olmo_clip_really_clips():
  c = _case("olmo_clip")
  assert c["config"].clip_qkv == 0.3
  unclipped = (
      Transformer(c["config"].replace(clip_qkv=None)).apply({"params": c["params"]}, c["ids"], c["mask"]).logits_BTV
  )
  assert (
      np.abs(np.asarray(unclipped) - c["hf_logits"])[c["mask"]].max() > 0.1
  )  # so the 1e-4 parity above tests clipping


def test_from_pretrained_on_hf_save_pretrained_dir(tmp_path):
  """models.io.from_pretrained on a dir written by HF save_pretrained gives the same logits as HF."""
  from displacement_jax.models import io

  c = _case("qwen2")
  c["model"].save_pretrained(str(tmp_path), safe_serialization=True)
  model, params, config = io.from_pretrained(str(tmp_path), progress=False)
  assert config.replace(extra=()) == c["config"].replace(extra=())
  logits = np.asarray(model.apply({"params": params}, c["ids"], c["mask"]).logits_BTV)
  assert np.abs(logits - c["hf_logits"])[c["mask"]].max() <= TOL


def test_gemma3_import_and_export_through_hf_dirs(tmp_path):
  """gemma3_text: a dir written by HF save_pretrained loads here with HF's logits; ours written by
  io.save_pretrained opens in transformers as Gemma3ForCausalLM with the same config and logits."""
  from displacement_jax.models import io  # pylint: disable=g-import-not-at-top
  from transformers import AutoModelForCausalLM  # pylint: disable=g-import-not-at-top

  c = _case("gemma3")
  c["model"].save_pretrained(str(tmp_path / "hf"), safe_serialization=True)
  model, params, config = io.from_pretrained(str(tmp_path / "hf"), progress=False)
  assert config.replace(extra=()) == c["config"].replace(extra=())
  logits = np.asarray(model.apply({"params": params}, c["ids"], c["mask"]).logits_BTV)
  assert np.abs(logits - c["hf_logits"])[c["mask"]].max() <= TOL
  io.save_pretrained(params, config, str(tmp_path / "ours"), progress=False)
  hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours"), dtype=torch.float32).eval()
  assert type(hf).__name__ == "Gemma3ForCausalLM"
  for key in ("layer_types", "sliding_window", "query_pre_attn_scalar", "rope_parameters", "hidden_activation"):
    assert getattr(hf.config, key) == getattr(c["model"].config, key), key
  logits, _ = _hf_run(hf, c["ids"], c["mask"])
  assert np.abs(logits - c["hf_logits"])[c["mask"]].max() <= TOL


@pytest.mark.parametrize("window", [None, 40])
def test_blocked_attention_equals_full_square(window):
  """'blocked' (the default without KV cache) = the full [T, T] reference attention, values and gradients, on a
  length that is not a multiple of the block, with padding, several packed segments and a sliding window."""
  from displacement_jax.models import transformer  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  b, t, n, kv, h = 2, 150, 4, 2, 16
  q, k, v = (jnp.asarray(rng.normal(size=(b, t, m, h)), jnp.float32) for m in (n, kv, kv))
  pos = np.arange(t)
  segment_BT = np.stack([pos // 70, np.where(pos < 120, 0, -1)])  # row 0: 3 segments; row 1: 30 padded slots
  mask = (pos[None, :, None] >= pos[None, None, :]) & (segment_BT[:, :, None] == segment_BT[:, None, :])
  mask &= (segment_BT >= 0)[:, None, :]
  if window:
    mask &= pos[None, :, None] - pos[None, None, :] < window
  mask = jnp.asarray(mask)
  w = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)

  def loss(impl, q, k, v):
    out = transformer.attention(q, k, v, mask, 0.25, impl)
    return jnp.sum(jnp.where((segment_BT >= 0)[:, :, None, None], out * w, 0.0)), out

  (_, ref), g_ref = jax.value_and_grad(functools.partial(loss, "reference"), argnums=(0, 1, 2), has_aux=True)(q, k, v)
  (_, blk), g_blk = jax.value_and_grad(functools.partial(loss, "blocked"), argnums=(0, 1, 2), has_aux=True)(q, k, v)
  real = (segment_BT >= 0)[:, :, None, None]
  np.testing.assert_allclose(np.where(real, blk, 0), np.where(real, ref, 0), atol=2e-6, rtol=1e-5)
  for a, r in zip(g_blk, g_ref):
    np.testing.assert_allclose(a, r, atol=2e-5, rtol=1e-4)


def test_query_block_bounds_the_number_of_blocks():
  """At least QUERY_BLOCK queries per block, a multiple of 8, and never more than MAX_QUERY_BLOCKS blocks."""
  from displacement_jax.models import transformer  # pylint: disable=g-import-not-at-top

  assert [transformer.query_block(t) for t in (1, 100, 512, 1024, 1030, 2048)] == [128, 128, 128, 128, 136, 256]
  for t in range(1, 5000, 7):
    block = transformer.query_block(t)
    assert block % 8 == 0 and block >= transformer.QUERY_BLOCK and -(-t // block) <= transformer.MAX_QUERY_BLOCKS
