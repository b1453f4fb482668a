"""LoRA training: one DPO step equals PEFT + torch on the same batch (loss, adapter gradients); a stopped run (with
adapter dropout) resumed from its checkpoint (adapters + optimizer state only) ends where the uninterrupted one
does; its live monitor and the exported adapter imported for scoring agree with its merged model."""

import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import peft
import pytest
import torch

from displacement_jax import forward, runtime
from displacement_jax.score import core as scoring
from displacement_jax.train import fns as fns_lib
from displacement_jax.train import lora as lora_train
from displacement_jax.train import loop as training
from displacement_jax.errors import UsageError
from displacement_jax.experiments import single_token
from displacement_jax.models import lora, peft_io
from displacement_jax.models.transformer import Transformer
import hf_tiny
import test_train
from test_train_parity_torch import BETA, LR, _batch, _ours_from_torch, _torch_logps


@pytest.mark.parametrize("base_dtype", ["float32", "bfloat16"])
def test_lora_dpo_step_matches_peft_torch(tmp_path, base_dtype):
  """A PEFT adapter (random A and B) imported with model.lora.path; the reference is the base model (adapters
  off) on both sides; our jitted LoRA train step (SGD) against torch autograd through PEFT. bfloat16: our base
  params stored in bf16 (torch's fp32 base rounded to the same values), adapters and optimizer state fp32."""
  tmodel = hf_tiny.build_tiny_hf_torch_model("llama", vocab_size=64, num_hidden_layers=2)
  if base_dtype == "bfloat16":
    with torch.no_grad():
      for p in tmodel.parameters():
        p.copy_(p.to(torch.bfloat16).to(torch.float32))
  model, params = _ours_from_torch(tmodel)
  params = jax.tree.map(lambda x: x.astype(base_dtype), params)
  pm = peft.get_peft_model(
      tmodel, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
  )
  pm.save_pretrained(str(tmp_path / "adapter"))
  batch = _batch(np.random.default_rng(0), 64)

  with torch.no_grad(), pm.disable_adapter():
    ref_w, ref_l = _torch_logps(pm, batch, "chosen"), _torch_logps(pm, batch, "rejected")
  pw, pl = _torch_logps(pm, batch, "chosen"), _torch_logps(pm, batch, "rejected")
  loss_t = -torch.nn.functional.logsigmoid(BETA * ((pw - pl) - (ref_w - ref_l))).mean()
  loss_t.backward()
  grads_t = {n: p.grad.numpy() for n, p in pm.named_parameters() if p.requires_grad}
  assert all(not p.requires_grad or "lora_" in n for n, p in pm.named_parameters())

  config = test_train.make_config(tmp_path / "run", tmp_path / "unused.jsonl")
  config.model.lora.path = str(tmp_path / "adapter")
  config.optim = ml_collections.ConfigDict(dict(name="sgd", lr=LR, grad_accum=1))
  config.loss.update(objective="dpo", beta=BETA)
  config.logprob_chunk_size = 4
  adapters, lora_config = peft_io.load_adapter(config.model.lora.path, model.config)  # as runtime.load_model does
  loaded = runtime.Loaded(Transformer(lora_config), lora.combine(params, adapters), lora_config, None, {})
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
  fns = fns_lib.Fns(**lora_train.make_fns(loaded, config, mesh, 1))
  ref = fns.logps(loaded.params, batch)  # the base tree: adapters off
  np.testing.assert_allclose(ref["chosen_logps_B"], ref_w.numpy(), atol=1e-4)
  state = fns.init_state(loaded.params)
  before = jax.device_get(state.params)
  jbatch = dict(batch, chosen_ref_logps_B=ref["chosen_logps_B"], rejected_ref_logps_B=ref["rejected_logps_B"])
  state, metrics = fns.train_step(state, jbatch)
  np.testing.assert_allclose(float(metrics["loss"]), float(loss_t.detach()), atol=1e-6)
  after = jax.device_get(state.params)
  worst = 0.0
  for (module, proj), node in {p[1:]: n for p, n in lora.adapter_nodes(before).items()}.items():
    for leaf in lora.ADAPTER_LEAVES:
      ours_grad = (np.asarray(node[leaf]) - np.asarray(after["layers"][module][proj][leaf])) / LR  # [L, in, r] etc.
      for i in range(ours_grad.shape[0]):
        theirs = grads_t[f"base_model.model.model.layers.{i}.{module}.{proj}.{leaf}.default.weight"].T
        scale = max(np.abs(theirs).max(), 1e-8)
        worst = max(worst, np.abs(ours_grad[i] - theirs).max() / scale)
  print(
      f"LoRA DPO step: loss {float(metrics['loss']):.6f} (torch {float(loss_t.detach()):.6f}); max rel grad diff {worst:.1e}"
  )
  assert worst < 1e-4
  assert set(jax.tree.leaves(jax.tree.map(lambda x: str(x.dtype), state.opt_state))) <= {"float32", "int32"}
  assert {str(x.dtype) for x in jax.tree.leaves(state.params)} == {"float32"}
  assert {str(x.dtype) for x in jax.tree.leaves(loaded.params)} == {base_dtype}  # the base as stored, untouched


def test_lora_run_resumes_exactly_and_ches_equals_merged(tmp_path):
  data = test_train._write_jsonl(tmp_path / "prefs.jsonl", test_train._rows())
  over = {"model.lora.rank": 4, "model.lora.target_modules": "q_proj,v_proj,down_proj", "num_steps": 4}
  over["model.lora.dropout"] = 0.1  # drawn from the state's rng: the resumed run must draw the same masks
  full = training.run(test_train.make_config(tmp_path / "full", data, **over, export_hf=True))
  assert "embed_tokens" not in full.params  # the result holds the adapters only
  stopped = test_train.make_config(tmp_path / "resumed", data, **over, **{"debug.stop_after_steps": 2})
  training.run(stopped)
  saved = ocp.StandardCheckpointer().restore(os.path.join(tmp_path / "resumed", "checkpoints", "2", "state"))
  assert set(saved["params"]["layers"]["self_attn"]) == {"q_proj", "v_proj"}  # adapters only
  assert "embed_tokens" not in saved["params"] and set(saved["params"]["layers"]) == {"self_attn", "mlp"}
  resumed = training.run(test_train.make_config(tmp_path / "resumed", data, **over), resume=True)
  for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(full.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  moved = max(float(np.abs(np.asarray(n["lora_B"])).max()) for n in lora.adapter_nodes(full.params).values())
  assert moved > 0

  # The exported adapter directory, imported for scoring (model.lora.path): CHES of the LoRA model = CHES of the
  # merged model (PEFT's merge_and_unload semantics, models.lora.merge)
  config = test_train.make_config(tmp_path / "score", data, **{"model.lora.path": str(full.hf_dir)})
  loaded = runtime.load_model(config)
  base, adapters = lora.split(jax.device_get(loaded.params))
  for a, b in zip(jax.tree.leaves(adapters), jax.tree.leaves(full.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  dataset = runtime.load_data(config, loaded.tokenizer, loaded.model_config.vocab_size)
  # the live monitor's last row (eval mode: no dropout) is the merged model's log-prob change from the base model
  monitored = dataset.pairs[: int(config.eval.max_samples)]  # evaluation.Monitor's rows
  batch = {k: jax.numpy.asarray(v) for k, v in runtime.collate(monitored, dataset.pad_id, config).items()}
  logps = jax.jit(lambda p: forward.pair_logps(loaded.model, p, batch, 4))
  now, ref = logps(lora.merge(base, adapters, loaded.model_config)), logps(base)
  change = {s: float(np.mean(now[f"{s}_logps_B"] - ref[f"{s}_logps_B"])) for s in ("chosen", "rejected")}
  assert full.monitor["monitor/preferred_logprob_change"] == pytest.approx(change["chosen"], rel=1e-4, abs=1e-5)
  assert full.monitor["monitor/dispreferred_logprob_change"] == pytest.approx(change["rejected"], rel=1e-4, abs=1e-5)
  assert abs(change["chosen"]) > 1e-3
  kw = dict(batch_size=8, max_length=32, progress=False, pad_id=dataset.pad_id)
  ours = scoring.score_pairs(loaded.model, loaded.params, dataset.pairs, **kw)
  merged = scoring.score_pairs(loaded.model, lora.merge(base, adapters, loaded.model_config), dataset.pairs, **kw)
  plain = scoring.score_pairs(loaded.model, base, dataset.pairs, **kw)
  for key in ("ches", "ln_ches"):
    a, b, c = (np.array([row[key] for row in rows]) for rows in (ours, merged, plain))
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())
    assert np.abs(a - c).max() > 10 * np.abs(a - b).max()  # the adapter changed the scores


def test_single_token_paths_need_adapters_with_lora():
  """The single-token SFT and the single-prompt DPO train adapters under config.model.lora: called without them
  (or with adapters and no LoRA config) they stop with a usage error naming it, never fine-tune everything
  silently."""
  config = test_train.make_config("unused", "unused.jsonl", **{"model.lora.rank": 4})
  with pytest.raises(UsageError, match="config.model.lora"):
    single_token.SFTOnPrompts(None, config)({}, None)  # refuses before any model is traced
  with config.unlocked():
    config.dpo = ml_collections.ConfigDict(dict(num_steps=1, objective="dpo", beta=0.1, lr=1e-3))
  with pytest.raises(UsageError, match="config.model.lora"):
    single_token.DPOOnOnePrompt(None, config)({}, {})
  with config.unlocked():
    config.model.lora.rank = 0
  with pytest.raises(UsageError, match="config.model.lora"):
    single_token.DPOOnOnePrompt(None, config)({}, {}, adapters={})
