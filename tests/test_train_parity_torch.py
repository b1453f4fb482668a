"""One DPO train step of ours (jitted trainer step, SGD, beta 0.1) equals the same step in PyTorch on the HF model."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from displacement_jax import forward
from displacement_jax.train import optim
from displacement_jax.train import step as step_lib
import hf_tiny

LR, BETA = 0.5, 0.1


def _batch(rng, vocab, b=3, prompt_len=(4, 6, 3), resp_len=((3, 5), (4, 2), (6, 3)), t=14):
  """A right-padded batch following the batch contract (prompt ++ response, labels shifted, loss mask)."""
  out = {}
  for s, side in enumerate(("chosen", "rejected")):
    ids = np.zeros((b, t), np.int32)
    mask = np.zeros((b, t), bool)
    labels = np.zeros((b, t), np.int32)
    loss = np.zeros((b, t), bool)
    for i in range(b):
      p, r = prompt_len[i], resp_len[i][s]
      seq = rng.integers(3, vocab, size=p + r)
      seq[:p] = out["chosen_input_ids_BT"][i, :p] if side == "rejected" else seq[:p]
      seq[-1] = hf_tiny.EOS_ID
      ids[i, : p + r] = seq
      mask[i, : p + r] = True
      labels[i, : p + r - 1] = seq[1:]
      loss[i, p - 1 : p + r - 1] = True
    out.update(
        {
            f"{side}_input_ids_BT": ids,
            f"{side}_attention_mask_BT": mask,
            f"{side}_labels_BT": labels,
            f"{side}_loss_mask_BT": loss,
        }
    )
  return out


def _torch_logps(model, batch, side):
  logits = model(
      input_ids=torch.tensor(batch[f"{side}_input_ids_BT"], dtype=torch.long),
      attention_mask=torch.tensor(batch[f"{side}_attention_mask_BT"], dtype=torch.long),
  ).logits
  logp = torch.log_softmax(logits.float(), -1)
  tok = torch.gather(logp, -1, torch.tensor(batch[f"{side}_labels_BT"], dtype=torch.long)[..., None])[..., 0]
  return (tok * torch.tensor(batch[f"{side}_loss_mask_BT"], dtype=torch.float32)).sum(-1)


def _ours_from_torch(tmodel):
  """Our Transformer + params holding exactly the torch model's weights (models.convert, no disk round trip)."""
  from displacement_jax.models import ModelConfig, Transformer
  from displacement_jax.models import convert

  config = ModelConfig.from_hf(tmodel.config.to_dict(), dtype="float32", param_dtype="float32")
  sd = {k: v.detach().numpy() for k, v in tmodel.state_dict().items()}
  params = jax.tree.map(jnp.asarray, convert.state_dict_to_params(sd, config))
  return Transformer(config), params


@pytest.mark.parametrize("family", ["llama"])
def test_dpo_step_matches_torch(family):
  tmodel = hf_tiny.build_tiny_hf_torch_model(family, vocab_size=64, num_hidden_layers=1)
  model, params = _ours_from_torch(tmodel)
  batch = _batch(np.random.default_rng(0), 64)

  # torch: reference pass, one SGD DPO step, updated log-probs.
  with torch.no_grad():
    ref_w, ref_l = _torch_logps(tmodel, batch, "chosen"), _torch_logps(tmodel, batch, "rejected")
  opt = torch.optim.SGD(tmodel.parameters(), lr=LR)
  pw, pl = _torch_logps(tmodel, batch, "chosen"), _torch_logps(tmodel, batch, "rejected")
  loss_t = -torch.nn.functional.logsigmoid(BETA * ((pw - pl) - (ref_w - ref_l))).mean()
  opt.zero_grad()
  loss_t.backward()
  opt.step()
  with torch.no_grad():
    new_w, new_l = _torch_logps(tmodel, batch, "chosen"), _torch_logps(tmodel, batch, "rejected")

  # ours: reference log-probs in the batch, jitted train step with SGD.
  ref = forward.pair_logps(model, params, batch, chunk_size=4)
  np.testing.assert_allclose(ref["chosen_logps_B"], ref_w.numpy(), atol=1e-4)
  jbatch = dict(batch, chosen_ref_logps_B=ref["chosen_logps_B"], rejected_ref_logps_B=ref["rejected_logps_B"])
  loss_cfg = ml_collections.ConfigDict(dict(objective="dpo", beta=BETA, sft_coeff=0.0, label_smoothing=0.0))
  opt_cfg = ml_collections.ConfigDict(dict(name="sgd", lr=LR))
  optimizer = optim.make_optimizer(opt_cfg, 1)
  step = jax.jit(step_lib.make_train_step(step_lib.make_loss_fn(model, loss_cfg, 4), optimizer, 1))
  state = step_lib.TrainState(
      params=params,
      opt_state=optimizer.init(params),
      step=jnp.zeros((), jnp.int32),
      rng=jax.random.key_data(jax.random.key(0)),
  )
  state, metrics = step(state, jbatch)
  np.testing.assert_allclose(float(metrics["loss"]), float(loss_t.detach()), atol=1e-6)
  new = forward.pair_logps(model, state.params, batch, chunk_size=4)
  change_t = (new_w - ref_w).numpy()
  assert np.abs(change_t).max() > 1e-3, "the step must move the log-probs for the test to mean anything"
  np.testing.assert_allclose(new["chosen_logps_B"], new_w.numpy(), atol=1e-5)
  np.testing.assert_allclose(new["rejected_logps_B"], new_l.numpy(), atol=1e-5)
  np.testing.assert_allclose(np.asarray(new["chosen_logps_B"]) - np.asarray(ref["chosen_logps_B"]), change_t, atol=1e-5)


def _sgd_dpo_step(model, params, batch):
  ref = forward.pair_logps(model, params, batch, chunk_size=4)
  jbatch = dict(batch, chosen_ref_logps_B=ref["chosen_logps_B"], rejected_ref_logps_B=ref["rejected_logps_B"])
  loss_cfg = ml_collections.ConfigDict(dict(objective="dpo", beta=BETA, sft_coeff=0.0, label_smoothing=0.0))
  optimizer = optim.make_optimizer(ml_collections.ConfigDict(dict(name="sgd", lr=LR)), 1)
  step = jax.jit(step_lib.make_train_step(step_lib.make_loss_fn(model, loss_cfg, 4), optimizer, 1))
  state = step_lib.TrainState(
      params=params,
      opt_state=optimizer.init(params),
      step=jnp.zeros((), jnp.int32),
      rng=jax.random.key_data(jax.random.key(0)),
  )
  return step(state, jbatch)[0].params


def test_freeze_pad_embedding_matches_torch_padding_idx():
  """HF's nn.Embedding(padding_idx=pad_token_id) gives the pad row no lookup gradient; model.freeze_pad_embedding
  reproduces that exactly, while the default (the true gradient) updates the row when the pad id is a real token,
  as SmolLM2's pad <|im_end|> is in every chat prompt."""
  tmodel = hf_tiny.build_tiny_hf_torch_model("llama", vocab_size=64, num_hidden_layers=1)
  pad = hf_tiny.PAD_ID
  assert tmodel.model.embed_tokens.padding_idx == pad
  model, params = _ours_from_torch(tmodel)
  batch = _batch(np.random.default_rng(1), 64)
  for side in ("chosen", "rejected"):  # the pad id as a real prompt token (position 1 of every row)
    batch[f"{side}_input_ids_BT"][:, 1] = pad
    batch[f"{side}_labels_BT"][:, 0] = pad
  row0 = np.asarray(params["embed_tokens"]["embedding"][pad]).copy()
  with torch.no_grad():
    ref_w, ref_l = _torch_logps(tmodel, batch, "chosen"), _torch_logps(tmodel, batch, "rejected")
  opt = torch.optim.SGD(tmodel.parameters(), lr=LR)
  pw, pl = _torch_logps(tmodel, batch, "chosen"), _torch_logps(tmodel, batch, "rejected")
  opt.zero_grad()
  (-torch.nn.functional.logsigmoid(BETA * ((pw - pl) - (ref_w - ref_l))).mean()).backward()
  opt.step()
  np.testing.assert_array_equal(tmodel.model.embed_tokens.weight.detach().numpy()[pad], row0)  # torch: frozen
  with torch.no_grad():
    new_w = _torch_logps(tmodel, batch, "chosen").numpy()

  frozen_model = model.__class__(model.config.replace(freeze_pad_embedding=True))
  frozen = _sgd_dpo_step(frozen_model, params, batch)
  np.testing.assert_array_equal(np.asarray(frozen["embed_tokens"]["embedding"][pad]), row0)
  np.testing.assert_allclose(
      forward.pair_logps(frozen_model, frozen, batch, chunk_size=4)["chosen_logps_B"], new_w, atol=1e-5
  )
  default = _sgd_dpo_step(model, params, batch)
  assert np.abs(np.asarray(default["embed_tokens"]["embedding"][pad]) - row0).max() > 1e-4  # the true gradient
  assert (
      np.abs(np.asarray(forward.pair_logps(model, default, batch, chunk_size=4)["chosen_logps_B"]) - new_w).max() > 1e-5
  )


def test_trl_metrics_equal_their_definitions_on_torch_logits():
  """logits/chosen, logits/rejected (TRL: token-weighted mean over completion positions of the mean-over-vocab
  logit, from the full torch logits) and the step's token count (non-padding tokens of both sequences), for the
  two-side and the shared-prompt packed layout."""
  from displacement_jax.data import packing  # pylint: disable=g-import-not-at-top

  tmodel = hf_tiny.build_tiny_hf_torch_model("llama", vocab_size=64, num_hidden_layers=1)
  model, params = _ours_from_torch(tmodel)
  batch = _batch(np.random.default_rng(2), 64)
  want = {}
  with torch.no_grad():
    for side in ("chosen", "rejected"):
      logits = tmodel(
          input_ids=torch.tensor(batch[f"{side}_input_ids_BT"], dtype=torch.long),
          attention_mask=torch.tensor(batch[f"{side}_attention_mask_BT"], dtype=torch.long),
      ).logits
      mask = torch.tensor(batch[f"{side}_loss_mask_BT"])
      want[f"logits/{side}"] = float(logits[mask].mean(-1).sum() / mask.sum())
      ref = _torch_logps(tmodel, batch, side)
      batch[f"{side}_ref_logps_B"] = ref.numpy()
  tokens = int(batch["chosen_attention_mask_BT"].sum() + batch["rejected_attention_mask_BT"].sum())
  loss_cfg = ml_collections.ConfigDict(dict(objective="dpo", beta=BETA, sft_coeff=0.0, label_smoothing=0.0))
  optimizer = optim.make_optimizer(ml_collections.ConfigDict(dict(name="sgd", lr=LR)), 1)
  step = jax.jit(step_lib.make_train_step(step_lib.make_loss_fn(model, loss_cfg, 4), optimizer, 1))
  packed = packing.pack_batch(batch, pad_id=0)  # [B] arrays (the reference log-probs) are carried along
  for layout in (batch, packed):
    state = step_lib.TrainState(
        params=params,
        opt_state=optimizer.init(params),
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(jax.random.key(0)),
    )
    _, metrics = step(state, layout)
    for key, value in want.items():
      np.testing.assert_allclose(float(metrics[key]), value, rtol=1e-5, atol=1e-6)
    assert int(metrics["tokens"]) == tokens
