"""LoRA against PEFT: logits on the same adapter weights (tiny Llama/OLMo/Gemma, the real SmolLM2), our adapter
directory in `PeftModel.from_pretrained`, our merge against `merge_and_unload`, PEFT's own init statistics, and
a zero-B adapter being exactly the base model."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

from displacement_jax.models import io as io_lib, lora, peft_io
from displacement_jax.models.config import ModelConfig
from displacement_jax.models.transformer import Transformer
from tests import hf_tiny


def _ids(vocab, shape=(2, 9), seed=0):
  ids = np.random.RandomState(seed).randint(3, vocab, shape).astype(np.int32)
  mask = np.ones(shape, bool)
  mask[1, :3] = False  # left padding on one row
  return ids, mask


def _torch_logits(model, ids, mask):
  pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  with torch.no_grad():
    return (
        model(
            input_ids=torch.from_numpy(ids).long(),
            attention_mask=torch.from_numpy(mask.astype(np.int64)),
            position_ids=torch.from_numpy(pos).long(),
        )
        .logits.float()
        .numpy()
    )


def _ours(config, params, adapters, ids, mask):
  tree = lora.combine(params, adapters) if adapters else params
  return np.asarray(Transformer(config).apply({"params": tree}, ids, mask).logits_BTV)


def _tiny(tmp_path, family):
  hf = hf_tiny.build_tiny_hf_torch_model(family, seed=3)
  base_dir = str(tmp_path / "base")
  hf.save_pretrained(base_dir)
  _, params, config = io_lib.from_pretrained(base_dir, progress=False)
  return hf, base_dir, params, config


@pytest.mark.parametrize(
    "family,targets", [("llama", "all-linear"), ("olmo", "all-linear"), ("gemma", ["q_proj", "v_proj", "down_proj"])]
)
def test_logits_equal_peft_on_its_adapter(tmp_path, family, targets):
  """PEFT's random adapter (init_lora_weights=False: B != 0), read from its own directory: equal logits."""
  hf, _, params, config = _tiny(tmp_path, family)
  pc = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, use_rslora=family == "olmo")
  pm = peft.get_peft_model(hf, pc).eval()
  pm.save_pretrained(str(tmp_path / "adapter"))
  adapters, lora_config = peft_io.load_adapter(str(tmp_path / "adapter"), config)
  ids, mask = _ids(config.vocab_size)
  ref, base = _torch_logits(pm, ids, mask), _torch_logits(pm.get_base_model(), ids, mask)
  with pm.disable_adapter():
    base = _torch_logits(pm, ids, mask)
  ours = _ours(lora_config, params, adapters, ids, mask)
  err, effect = np.abs(ours - ref)[mask].max(), np.abs(ref - base)[mask].max()
  print(f"{family} {targets}: max |ours - PEFT| {err:.1e}, adapter effect {effect:.2f}")
  assert effect > 0.1 and err < 1e-4


def test_export_loads_in_peft_and_merge_equals_merge_and_unload(tmp_path):
  hf, base_dir, params, config = _tiny(tmp_path, "llama")
  config = lora.with_lora(config, alpha=16)
  adapters = lora.init_adapters(params, 4, ["q_proj", "v_proj", "up_proj"], jax.random.key(0))
  adapters = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), adapters)  # B != 0
  peft_io.save_adapter(adapters, config, str(tmp_path / "ours"), base_model_name_or_path=base_dir)
  saved = json.load(open(tmp_path / "ours" / peft_io.CONFIG_FILE))
  assert (saved["r"], saved["lora_alpha"], saved["target_modules"]) == (4, 16.0, ["q_proj", "v_proj", "up_proj"])
  pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "ours")).eval()
  ids, mask = _ids(config.vocab_size)
  ours = _ours(config, params, adapters, ids, mask)
  ref = _torch_logits(pm, ids, mask)
  assert np.abs(ours - ref)[mask].max() < 1e-4
  # --merge: a plain HF checkpoint equal to PEFT's merge_and_unload, tensor by tensor
  peft_io.save_merged(params, adapters, config, str(tmp_path / "merged"), progress=False)
  merged_hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
  theirs = pm.merge_and_unload().state_dict()
  mine = merged_hf.state_dict()
  assert set(k for k in theirs if "rotary" not in k) == set(k for k in mine if "rotary" not in k)
  worst = max(float((mine[k] - theirs[k]).abs().max()) for k in theirs if "rotary" not in k)
  assert worst < 1e-6
  assert np.abs(_torch_logits(merged_hf, ids, mask) - ref)[mask].max() < 1e-4


def test_zero_b_adapter_is_the_base_model_and_init_is_peft_init(tmp_path):
  hf, _, params, config = _tiny(tmp_path, "olmo")
  config = lora.with_lora(config, alpha=32, dropout=0.1)
  adapters = lora.init_adapters(params, 8, "all-linear", jax.random.key(0))
  ids, mask = _ids(config.vocab_size)
  assert np.array_equal(_ours(config, params, adapters, ids, mask), _ours(config, params, None, ids, mask))
  # A's law: PEFT's kaiming_uniform_(a=sqrt(5)) on [r, in] is uniform on +-1/sqrt(in); compare with PEFT's own
  pm = peft.get_peft_model(hf, peft.LoraConfig(r=8, lora_alpha=32, target_modules="all-linear"))
  for path, node in lora.adapter_nodes(adapters).items():
    a = np.asarray(node["lora_A"])
    peft_a = pm.base_model.model.model.layers[0].get_submodule(".".join(path[1:])).lora_A["default"].weight
    bound = 1 / np.sqrt(a.shape[1])
    assert np.abs(a).max() <= bound and np.abs(peft_a.detach().numpy()).max() <= bound
    assert abs(a.std() - bound / np.sqrt(3)) < 0.15 * bound / np.sqrt(3)  # uniform's std
    assert not np.asarray(node["lora_B"]).any()
  assert sorted(p[-1] for p in lora.adapter_nodes(adapters)) == sorted(lora.MODULE_OF)


def test_bad_adapter_directory_names_the_field(tmp_path):
  _, _, params, config = _tiny(tmp_path, "llama")
  config = lora.with_lora(config, alpha=8)
  adapters = lora.init_adapters(params, 2, "q_proj", jax.random.key(0))
  out = peft_io.save_adapter(adapters, config, str(tmp_path / "a"))
  cfg = json.load(open(os.path.join(out, peft_io.CONFIG_FILE)))
  json.dump(dict(cfg, use_dora=True), open(os.path.join(out, peft_io.CONFIG_FILE), "w"))
  with pytest.raises(ValueError, match="use_dora=True is not supported"):
    peft_io.load_adapter(out, config)
  with pytest.raises(ValueError, match="target_modules.*'lm_head'"):
    lora.target_modules("q_proj,lm_head")


def test_dropout_law_equals_torch_dropout():
  """The adapter input's dropout in train mode (a 'dropout' rng given) has torch.nn.Dropout's law: a share p of
  zeros and the survivors scaled by 1 / (1 - p); with no rng (eval mode) it is off."""
  p, d = 0.25, 64
  config = lora.with_lora(
      ModelConfig(
          model_type="llama",
          vocab_size=8,
          hidden_size=d,
          intermediate_size=8,
          num_layers=1,
          num_heads=1,
          num_kv_heads=1,
          head_dim=d,
      ),
      alpha=d,
      dropout=p,
  )
  x, eye = jnp.ones((512, d)), jnp.eye(d)  # A = B = I, scaling alpha / r = 1: the term is dropout(x)
  ours = np.asarray(lora.adapter_term(x, eye, eye, config, jax.random.key(0)))
  theirs = torch.nn.Dropout(p).train()(torch.ones(512, d)).numpy()
  for out in (ours, theirs):
    assert abs((out == 0).mean() - p) < 0.01
    np.testing.assert_allclose(out[out != 0], 1 / (1 - p), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(lora.adapter_term(x, eye, eye, config, None)), np.ones((512, d)))
