"""The demo pipeline end to end on the tiny random Llama (`configs/persona_demo.py:tiny`), shortened, through `train.main` like
the README command; the packaged SmolLM2 run of the same pipeline is in tests/test_real_checkpoint.py."""

import json
import os

import numpy as np
import pytest

from displacement_jax import theory
from displacement_jax.experiments import persona_demo as demo
from displacement_jax.experiments import single_token
from displacement_jax.train import main as train_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT_STEPS, DPO_STEPS = 8, 12


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("demo")
  rc = train_lib.main(
      [
          "train",
          f'--config={os.path.join(ROOT, "configs", "persona_demo.py")}:tiny',
          f"--config.output_dir={out}",
          f"--config.sft.num_steps={SFT_STEPS}",
          f"--config.dpo.num_steps={DPO_STEPS}",
          "--config.progress=False",
      ]
  )
  assert rc == 0
  return str(out)


def test_outputs_exist(demo_run):
  for name in (demo.SUMMARY_FILE, demo.THEORY_FILE, demo.TRAJECTORY_FILE, demo.PLOT_FILE):
    assert os.path.getsize(os.path.join(demo_run, name)) > 0, name
  with open(os.path.join(demo_run, demo.PLOT_FILE), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  sft_rows = [json.loads(line) for line in open(os.path.join(demo_run, "sft", "metrics.jsonl"))]
  assert [r["step"] for r in sft_rows] == list(range(1, SFT_STEPS + 1)) and all(
      np.isfinite(r["loss"]) for r in sft_rows
  )


def test_prediction_equals_theory_recomputed(demo_run):
  summary = json.load(open(os.path.join(demo_run, demo.SUMMARY_FILE)))
  th = np.load(os.path.join(demo_run, demo.THEORY_FILE))
  W, h, cands = th["W_VD"], th["h_D"], [int(c) for c in th["candidates"]]
  # p_V stored by the demo is softmax(W h): the saved W/h are the ones the model used.
  logits = W.astype(np.float64) @ h.astype(np.float64)
  np.testing.assert_allclose(
      th["p_V"], np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum(), rtol=1e-3, atol=1e-6
  )
  lp = summary["loss_derivative"]
  np.testing.assert_allclose(lp, -0.1 / 2, rtol=1e-6)  # DPO l' at the reference point: -beta * sigmoid(0)
  rates = {(a, b): float(theory.logprob_rate(W, h, a, b, loss_derivative=lp)) for a in cands for b in cands if a != b}
  best = min(rates, key=rates.get)
  assert (summary["y_pos"], summary["y_neg"]) == best
  np.testing.assert_allclose(summary["predicted_rate"], rates[best], rtol=1e-6)
  assert summary["predicted_displacement"] == (rates[best] < 0)
  predicted = np.asarray(theory.rank_gainers(W, h, best[0], best[1], loss_derivative=lp))[
      : len(summary["predicted_gainers"])
  ]
  assert summary["predicted_gainers"] == [int(t) for t in predicted]


def test_displacement_flag_matches_trajectory(demo_run):
  summary = json.load(open(os.path.join(demo_run, demo.SUMMARY_FILE)))
  traj = np.load(os.path.join(demo_run, demo.TRAJECTORY_FILE))
  logp_SV, loss_S = traj["logp_SV"], traj["loss_S"]
  assert logp_SV.shape[0] == loss_S.shape[0] == DPO_STEPS + 1
  np.testing.assert_allclose(np.exp(logp_SV).sum(-1), 1.0, rtol=1e-4)
  p_pos = np.exp(logp_SV[:, summary["y_pos"]].astype(np.float64))
  assert summary["displaced"] == bool(p_pos[-1] < p_pos[0])
  np.testing.assert_allclose(summary["preferred_prob_start"], p_pos[0], rtol=1e-6)
  np.testing.assert_allclose(summary["preferred_prob_end"], p_pos[-1], rtol=1e-6)
  np.testing.assert_allclose(summary["largest_drop"], p_pos[0] - p_pos.min(), rtol=1e-6, atol=1e-9)
  assert summary["loss_fell"] == bool(loss_S[-1] < loss_S[0])
  np.testing.assert_allclose(loss_S[0], np.log(2.0), rtol=1e-5)  # DPO at the reference point: -log sigmoid(0)
  gain = np.exp(logp_SV[-1].astype(np.float64)) - np.exp(logp_SV[0].astype(np.float64))
  gain[[summary["y_pos"], summary["y_neg"]]] = -np.inf
  assert summary["measured_gainers"][0] == int(np.argmax(gain))


def test_pick_pair_and_summary_units():
  rates = np.array([[np.nan, 2.0, -1.0], [-3.0, np.nan, 0.5], [1.0, -3.0, np.nan]])
  assert single_token.pick_pair(rates, [10, 11, 12]) == (11, 10, -3.0)  # ties: first in row-major order
  logp = np.log(np.array([[0.5, 0.3, 0.2], [0.2, 0.1, 0.7], [0.4, 0.1, 0.5]]))
  s = single_token.summarize_trajectory(logp, np.array([0.69, 0.5, 0.4]), y_pos=0, y_neg=1, top_k=1)
  assert s["displaced"] and s["loss_fell"] and s["measured_gainers"] == [2]
  np.testing.assert_allclose([s["largest_drop"], s["preferred_prob_min"]], [0.3, 0.2])
  assert s["preferred_prob_argmin_step"] == 1


@pytest.mark.parametrize("shuffle", [True, False])
def test_single_token_sft_equals_training_run(tmp_path, shuffle):
  """SFTOnPrompts (one forward of each prompt batch per step) against `training.run` on the same SFT config (two
  forwards per pair, the monitor off): the same batches in the same order, equal losses and final params. SGD:
  the update is linear in the gradient (RMSprop's first step, lr * g / |g| * 10, turns the float noise of
  near-zero gradient entries into lr-sized differences). LoRA: test_lora_demo_trains_adapters_on_the_merged_sft_model.
  """
  import sys

  sys.path.insert(0, ROOT)
  from configs import persona_demo as demo_config  # pylint: disable=g-import-not-at-top
  from displacement_jax import runtime  # pylint: disable=g-import-not-at-top
  from displacement_jax.train import loop as training  # pylint: disable=g-import-not-at-top
  from displacement_jax.data import schema  # pylint: disable=g-import-not-at-top

  config = demo_config.get_config("tiny")
  config.output_dir = str(tmp_path)
  config.progress = False
  config.sft.num_steps = 6
  config.sft.batch_size = 4
  config.data.shuffle = shuffle
  config.optim.name, config.sft.lr = "sgd", 0.5
  examples = list(schema.load_preference_data(config.data.path))
  loaded, losses = single_token.run_sft(config, examples, log=lambda _: None)
  reference = training.run(single_token.sft_config(config))
  # float32 sums in another order (the training path compacts response positions and skips padding chunks of its
  # LM head): 2.04e-5 relative at the 6th loss on 2026-12-05 after a step at loss 18.7; a wrong batch or update
  # differs by percents
  np.testing.assert_allclose(losses, reference.losses, rtol=1e-4)
  assert len(losses) == 6
  initial = runtime.load_model(single_token.sft_config(config)).params
  assert max(np.abs(a - b).max() for a, b in zip(jax_leaves(loaded.params), jax_leaves(initial))) > 1e-2  # it moved
  for a, b in zip(jax_leaves(loaded.params), jax_leaves(reference.params), strict=True):
    # float32 sums in another order, 6 steps of lr 0.5: CI saw one entry of 8192 at 1.5e-5 absolute (the params
    # move by > 1e-2, so 5e-5 still tells a wrong batch or a wrong update apart).
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5)


def leaf_paths(tree):
  import jax  # pylint: disable=g-import-not-at-top

  return ["/".join(str(k.key) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def jax_leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top

  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_lora_demo_trains_adapters_on_the_merged_sft_model(tmp_path):
  """The demo with config.model.lora (rank 4, all-linear; SGD as in the test above): the SFT trains adapters as
  `training.run`'s LoRA run trains them (itself checked against PEFT + torch: equal losses and adapters), writes
  them as a PEFT directory and merges them (every param but the adapted kernels as loaded); the theory phase and the
  DPO trajectory see that merged model (PEFT's merge_and_unload of the saved directory on the loaded base); the DPO
  phase's fresh adapters start at it (step 0 is the merged SFT model's distribution) and move it."""
  import sys

  import jax  # pylint: disable=g-import-not-at-top

  sys.path.insert(0, ROOT)
  from configs import persona_demo as demo_config  # pylint: disable=g-import-not-at-top
  from displacement_jax import forward, runtime  # pylint: disable=g-import-not-at-top
  from displacement_jax.data import schema  # pylint: disable=g-import-not-at-top
  from displacement_jax.models import lora, peft_io  # pylint: disable=g-import-not-at-top
  from displacement_jax.train import loop as training  # pylint: disable=g-import-not-at-top

  config = demo_config.get_config("tiny")
  over = {"output_dir": str(tmp_path), "sft.num_steps": 4, "sft.batch_size": 4, "dpo.num_steps": 4}
  over.update({"optim.name": "sgd", "sft.lr": 0.5, "dpo.lr": 0.5, "model.lora.rank": 4, "progress": False})
  config_py = os.path.join(ROOT, "configs", "persona_demo.py")
  assert train_lib.main(["train", f"--config={config_py}:tiny", *(f"--config.{k}={v}" for k, v in over.items())]) == 0
  for key, value in over.items():
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      node = node[part]
    node[leaf] = value
  sft_losses = [json.loads(line)["loss"] for line in open(os.path.join(tmp_path, "sft", "metrics.jsonl"))]
  loaded = runtime.load_model(single_token.sft_config(config))  # the base, as the demo loaded it
  adapters, lora_config = peft_io.load_adapter(os.path.join(tmp_path, "sft", "adapter"), loaded.model_config)
  reference = training.run(single_token.sft_config(config))  # LoRA SFT as training.run runs it (after the demo)
  np.testing.assert_allclose(sft_losses, reference.losses, rtol=1e-4)
  for a, b in zip(jax_leaves(adapters), jax_leaves(reference.params), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5)  # float32 sums in another order (the test above)
  assert max(np.abs(a).max() for a in jax_leaves(adapters)) > 0
  merged = lora.merge(jax.device_get(loaded.params), adapters, lora_config)
  adapted = {"/".join(p) + "/kernel" for p in lora.adapter_nodes(adapters)}
  for path, a, b in zip(leaf_paths(merged), jax_leaves(merged), jax_leaves(loaded.params), strict=True):
    if path not in adapted:  # embeddings, norms, LM head: as loaded
      np.testing.assert_array_equal(a, b, err_msg=path)
  example = list(schema.load_preference_data(config.data.path))[int(config.dpo.prompt_index)]
  batch = {k: jax.numpy.asarray(v) for k, v in single_token.prompt_batch(example, loaded.tokenizer, config).items()}
  expected = forward.next_token_outputs(loaded.model, merged, batch)
  th, traj = np.load(os.path.join(tmp_path, demo.THEORY_FILE)), np.load(os.path.join(tmp_path, demo.TRAJECTORY_FILE))
  np.testing.assert_allclose(th["p_V"], np.asarray(expected["prob_BV"][0]), rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(traj["logp_SV"][0], np.asarray(expected["logp_BV"][0]), rtol=1e-5, atol=1e-6)
  base_V = np.asarray(forward.next_token_outputs(loaded.model, loaded.params, batch)["logp_BV"][0])
  assert np.abs(traj["logp_SV"][0] - base_V).max() > 1e-3  # the SFT adapters moved the model
  assert np.abs(traj["logp_SV"][-1] - traj["logp_SV"][0]).max() > 1e-5  # the DPO adapters moved it again
  np.testing.assert_allclose(traj["loss_S"][0], np.log(2.0), rtol=1e-5)  # the reference is the DPO start
