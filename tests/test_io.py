"""Checkpoint I/O: sharded safetensors loading (1 and 8 simulated devices) vs HF PyTorch, save round trips, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from displacement_jax.models import io
from displacement_jax.models.config import ModelConfig
from displacement_jax.models.transformer import init_params

sys.path.insert(0, os.path.dirname(__file__))
import hf_tiny  # noqa: E402  pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDS_BT = np.random.default_rng(0).integers(3, 300, size=(2, 7)).astype(np.int32)


def _ours_logits(model, params, ids_BT=IDS_BT):
  out = model.apply({"params": params}, jnp.asarray(ids_BT), jnp.ones(ids_BT.shape, bool))
  return np.asarray(out.logits_BTV)


def _hf_logits(hf_model, ids_BT=IDS_BT):
  with torch.no_grad():
    return hf_model(torch.tensor(ids_BT, dtype=torch.long)).logits.float().numpy()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  """A tiny random HF Llama saved by transformers as 4 safetensors shards + index, and its reference logits."""
  hf_model = hf_tiny.build_tiny_hf_torch_model("llama")
  ckpt = str(tmp_path_factory.mktemp("llama_sharded"))
  hf_model.save_pretrained(ckpt, max_shard_size="150KB")
  state = {k: v.numpy() for k, v in hf_model.state_dict().items()}
  return {"dir": ckpt, "hf": hf_model, "ref_logits": _hf_logits(hf_model), "state": state}


@pytest.fixture(scope="module")
def llama_loaded(llama):
  return io.from_pretrained(llama["dir"], progress=False)


def test_sharded_checkpoint_is_really_sharded(llama):
  with open(os.path.join(llama["dir"], io.INDEX_FILE)) as f:
    shards = set(json.load(f)["weight_map"].values())
  assert len(shards) >= 3


def test_load_matches_hf_pytorch(llama, llama_loaded):
  model, params, config = llama_loaded
  assert config.model_type == "llama" and config.vocab_size == 300 and not config.tie_word_embeddings
  np.testing.assert_allclose(_ours_logits(model, params), llama["ref_logits"], atol=1e-4, rtol=1e-4)
  # Tensors are placed exactly (Linear weights transposed).
  q = llama["state"]["model.layers.1.self_attn.q_proj.weight"]
  np.testing.assert_array_equal(np.asarray(params["layers"]["self_attn"]["q_proj"]["kernel"][1]), q.T)  # layer 1


_EIGHT_DEVICE_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from displacement_jax import sharding
    from displacement_jax.models import io
    ckpt, ids_file, out_file = sys.argv[1:]
    assert jax.device_count() == 8, jax.devices()
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    model, params, config = io.from_pretrained(ckpt, mesh=mesh, progress=False)
    ids = np.load(ids_file)
    fn = jax.jit(lambda p, i: model.apply({"params": p}, i, jnp.ones(i.shape, bool)).logits_BTV)
    logits = fn(params, jnp.asarray(ids))
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    info = {jax.tree_util.keystr(k): {"spec": [None if a is None else a for a in v.sharding.spec],
                                      "shard_shape": list(v.addressable_shards[0].data.shape),
                                      "n_devices": len(v.sharding.device_set)} for k, v in flat}
    np.save(out_file + ".npy", np.asarray(logits))
    json.dump(info, open(out_file + ".json", "w"))
    """)


def test_load_on_8_device_mesh_matches_1_device_and_hf(llama, llama_loaded, tmp_path):
  model, params, _ = llama_loaded
  script = tmp_path / "load8.py"
  script.write_text(_EIGHT_DEVICE_SCRIPT)
  ids_file = tmp_path / "ids.npy"
  np.save(ids_file, IDS_BT)
  env = dict(
      os.environ,
      XLA_FLAGS="--xla_force_host_platform_device_count=8",
      JAX_PLATFORMS="cpu",
      PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
  )
  out = str(tmp_path / "out")
  proc = subprocess.run(
      [sys.executable, str(script), llama["dir"], str(ids_file), out],
      env=env,
      capture_output=True,
      text=True,
      timeout=240,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  logits8 = np.load(out + ".npy")
  np.testing.assert_allclose(logits8, _ours_logits(model, params), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(logits8, llama["ref_logits"], atol=1e-4, rtol=1e-4)
  info = json.load(open(out + ".json"))
  q = info["['layers']['self_attn']['q_proj']['kernel']"]  # [2 layers, 64, 64]: the layer axis is never split
  assert q["spec"] == [None, "fsdp", "tensor"] and q["shard_shape"] == [2, 32, 32] and q["n_devices"] == 8
  o = info["['layers']['self_attn']['o_proj']['kernel']"]
  assert o["spec"] == [None, "tensor", "fsdp"] and o["shard_shape"] == [2, 32, 32]
  emb = info["['embed_tokens']['embedding']"]  # [300, 64]
  assert emb["spec"] == ["tensor", "fsdp"] and emb["shard_shape"] == [150, 32]
  head = info["['lm_head']['kernel']"]  # [64, 300]
  assert head["spec"] == ["fsdp", "tensor"] and head["shard_shape"] == [32, 150]
  norm = info["['norm']['scale']"]
  assert norm["spec"] == [] and norm["shard_shape"] == [64]


def test_save_round_trip_through_transformers(llama, llama_loaded, tmp_path):
  model, params, config = llama_loaded
  out = io.save_pretrained(params, config, str(tmp_path / "ours"), max_shard_bytes=100_000, progress=False)
  files = sorted(os.listdir(out))
  assert io.INDEX_FILE in files and sum(f.endswith(".safetensors") for f in files) >= 4
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(out)
  np.testing.assert_allclose(_hf_logits(hf_model), _ours_logits(model, params), atol=1e-4, rtol=1e-4)
  _, params2, config2 = io.from_pretrained(out, progress=False)
  assert config2.replace(extra=()) == config.replace(extra=())
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)


def test_save_round_trip_tied_random_params(tmp_path):
  """Params that never came from HF (random init, tied OLMo-style config, single file) survive transformers."""
  config = ModelConfig(
      model_type="olmo",
      vocab_size=96,
      hidden_size=32,
      intermediate_size=64,
      num_layers=2,
      num_heads=4,
      num_kv_heads=4,
      head_dim=8,
      norm_type="layernorm_nonparam",
      norm_eps=1e-5,
      tie_word_embeddings=True,
      max_position_embeddings=64,
  )
  params = init_params(config, jax.random.key(3))
  out = io.save_pretrained(params, config, str(tmp_path / "olmo"), progress=False)
  assert sorted(f for f in os.listdir(out) if f.endswith(".safetensors")) == ["model.safetensors"]
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(out)
  ids = IDS_BT % 96
  model, params2, _ = io.from_pretrained(out, progress=False)
  np.testing.assert_allclose(_hf_logits(hf_model, ids), _ours_logits(model, params, ids), atol=1e-4, rtol=1e-4)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)


def test_bf16_checkpoints(llama, tmp_path):
  # Written by transformers in bf16 -> loaded bit-exactly.
  hf_bf16 = hf_tiny.build_tiny_hf_torch_model("llama").to(torch.bfloat16)
  hf_bf16.save_pretrained(str(tmp_path / "hf_bf16"))
  _, params, config = io.from_pretrained(str(tmp_path / "hf_bf16"), dtype="bfloat16", progress=False)
  kernel = params["layers"]["mlp"]["down_proj"]["kernel"][0]
  assert kernel.dtype == jnp.bfloat16 and config.param_dtype == "bfloat16"
  ref = hf_bf16.model.layers[0].mlp.down_proj.weight.detach().float().numpy().T
  np.testing.assert_array_equal(np.asarray(kernel, np.float32), ref)
  # Written by us in bf16 -> transformers reads the same bf16 values.
  out = io.save_pretrained(params, config, str(tmp_path / "ours_bf16"), dtype="bfloat16", progress=False)
  header, _ = io.read_safetensors_header(os.path.join(out, "model.safetensors"))
  assert {v["dtype"] for v in header.values()} == {"BF16"}
  hf_back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
  np.testing.assert_array_equal(hf_back.model.layers[0].mlp.down_proj.weight.detach().float().numpy().T, ref)


def _write_ckpt(path, state, hf_config):
  os.makedirs(path, exist_ok=True)
  safetensors.numpy.save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf_config, f)
  return str(path)


@pytest.fixture(scope="module")
def llama_hf_config(llama):
  with open(os.path.join(llama["dir"], "config.json")) as f:
    return json.load(f)


def test_missing_tensor_is_named(llama, llama_hf_config, tmp_path):
  state = dict(llama["state"])
  del state["model.layers.1.mlp.up_proj.weight"]
  with pytest.raises(ValueError, match=r"missing tensor\(s\) 'model\.layers\.1\.mlp\.up_proj\.weight'"):
    io.from_pretrained(_write_ckpt(tmp_path / "c", state, llama_hf_config), progress=False)


def test_wrong_shape_is_named(llama, llama_hf_config, tmp_path):
  state = dict(llama["state"])
  state["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)
  with pytest.raises(
      ValueError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight': expected shape \(32, 64\), got \(16, 64\)"
  ):
    io.from_pretrained(_write_ckpt(tmp_path / "c", state, llama_hf_config), progress=False)


def test_unknown_tensors_are_named(llama, llama_hf_config, tmp_path):
  state = dict(
      llama["state"],
      **{
          "model.layers.0.self_attn.q_norm.weight": np.ones(64, np.float32),
          "model.layers.7.mlp.up_proj.weight": np.ones((128, 64), np.float32),
      },
  )
  with pytest.raises(
      ValueError,
      match=r"2 unknown tensor name\(s\).*'model\.layers\.0\.self_attn\.q_norm\.weight', "
      r"'model\.layers\.7\.mlp\.up_proj\.weight'",
  ):
    io.from_pretrained(_write_ckpt(tmp_path / "c", state, llama_hf_config), progress=False)


def test_unsupported_model_type_lists_supported(llama, llama_hf_config, tmp_path):
  path = _write_ckpt(tmp_path / "c", {"x": np.zeros(2, np.float32)}, dict(llama_hf_config, model_type="gpt2"))
  with pytest.raises(ValueError, match=r"'gpt2'.*llama, mistral, qwen2, olmo, gemma"):
    io.from_pretrained(path, progress=False)


def test_offline_hub_id_not_cached(monkeypatch):
  import huggingface_hub

  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  with pytest.raises(ValueError, match=r"'displacement-jax-test/no-such-model' is not a local directory.*offline"):
    io.from_pretrained("displacement-jax-test/no-such-model", progress=False)


def test_save_rejects_wrong_param_shape(llama_loaded, tmp_path):
  _, params, config = llama_loaded
  bad = dict(params, norm={"scale": jnp.ones(63)})
  with pytest.raises(ValueError, match=r"param norm/scale has shape \(63,\), expected \(64,\)"):
    io.save_pretrained(bad, config, str(tmp_path / "bad"), progress=False)


def test_safetensors_reader_matches_torch_state_dict(llama):
  """Our memory-mapped reader returns exactly the tensors transformers wrote, across all shards."""
  tensors = dict(io.iter_checkpoint_tensors(llama["dir"]))
  assert set(tensors) == set(llama["state"])
  for name, arr in tensors.items():
    np.testing.assert_array_equal(arr, llama["state"][name])
