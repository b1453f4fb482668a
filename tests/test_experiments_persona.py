"""Section 3 pipeline end to end on the tiny persona fixture: SFT -> HF export -> single-prompt DPO per seed."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from displacement_jax import report
from displacement_jax.train import metrics
from displacement_jax.data import schema, tokenize
from displacement_jax.experiments import persona, persona_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import persona as persona_config  # noqa: E402

# The tiny runs repeat the same jitted shapes: compile them once (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("xla_compilation_cache")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  config = persona_config.get_config("model=olmo1b,tiny")
  config.output_dir = str(tmp_path_factory.mktemp("persona"))
  return config, persona.run(config)


def test_sft_then_dpo_per_seed(run_dir):
  config, out = run_dir
  assert out["sft"]["steps"] == 2 and out["sft"]["n_rows"] == 8  # 8 prompts, batch 4, one epoch
  assert os.path.isfile(os.path.join(out["sft"]["hf_dir"], "config.json"))
  assert [r["seed"] for r in out["dpo"]] == list(persona_data.DPO_SEEDS[:2])
  rows = schema.load_persona_rows(config.persona.data_path)
  for r in out["dpo"]:
    d = os.path.join(config.output_dir, "dpo", f'seed_{r["seed"]}')
    with open(os.path.join(d, "result.json")) as f:
      assert json.load(f) == r
    assert r["prompt_row"] == int(np.random.default_rng(r["seed"]).integers(8))
    probs = [m["monitor/preferred_prob"] for m in metrics.read_metrics(d) if "monitor/preferred_prob" in m]
    assert len(probs) == 6 and r["steps"] == 5  # step 0 + 5 DPO steps
    assert (r["start"], r["end"], r["min"]) == (probs[0], probs[-1], min(probs))
    assert r["largest_drop"] == pytest.approx(max(probs[0] - min(probs), 0.0))
    assert len(r["top_k_gainers"]) == 5 and "No" not in r["top_k_gainers"] and "Never" not in r["top_k_gainers"]
    assert set(r["benign"] + r["catastrophic"]) <= set(r["top_k_gainers"])
    assert rows[r["prompt_row"]]["question"] in open(os.path.join(d, "dpo_data.jsonl")).read()


def test_fast_seeds_equal_training_run_per_seed(run_dir, tmp_path):
  """persona.fast (one model, one compiled step for all seeds) against one training.run per seed with the monitor
  every step, from the same SFT export: equal pi(y+) trajectories, summaries and metrics rows."""
  from displacement_jax.experiments import common

  config, out = run_dir
  dpo_dir = os.path.join(config.output_dir, "dpo")
  fields = {"model.path": out["sft"]["hf_dir"], "model.tiny": "", "model.tokenizer": out["sft"]["hf_dir"]}
  fields.update({"persona.phase": "dpo", "persona.fast": False, "output_dir": str(tmp_path)})
  slow = persona.run_dpo(common.derive(config, fields))
  for fast_r, slow_r in zip(out["dpo"], slow):
    assert fast_r.keys() == slow_r.keys()
    for key, value in fast_r.items():
      if isinstance(value, float):
        assert value == pytest.approx(slow_r[key], rel=1e-4, abs=1e-6), key
      else:
        assert value == slow_r[key], key
    rows = {
        name: [m for m in metrics.read_metrics(os.path.join(d, f'seed_{fast_r["seed"]}')) if "monitor/loss" in m]
        for name, d in (("fast", dpo_dir), ("slow", str(tmp_path)))
    }
    assert [m["step"] for m in rows["fast"]] == [m["step"] for m in rows["slow"]] == list(range(6))
    for key in ("monitor/preferred_prob", "monitor/preferred_logprob_change", "monitor/loss"):
      np.testing.assert_allclose(
          [m[key] for m in rows["fast"]], [m[key] for m in rows["slow"]], rtol=1e-4, atol=1e-6, err_msg=key
      )


def test_lora_fast_seeds_equal_training_run_per_seed(run_dir, tmp_path):
  """LoRA (model.lora.rank 4, q_proj,v_proj) in the single-token experiment: the fast route (DPOOnOnePrompt on the
  adapters, one compiled step) equals one train.loop.run per seed (train.lora, its live monitor every step); step 0
  is the SFT model (a fresh adapter is the base model), the end differs from full fine-tuning's."""
  from displacement_jax.experiments import common

  config, out = run_dir
  fields = {"model.path": out["sft"]["hf_dir"], "model.tiny": "", "model.tokenizer": out["sft"]["hf_dir"]}
  fields.update({"persona.phase": "dpo", "model.lora.rank": 4, "model.lora.target_modules": "q_proj,v_proj"})
  fields["persona.seeds"] = tuple(config.persona.seeds)[:1]  # one seed: the step is the same for every seed
  fast = persona.run_dpo(common.derive(config, {**fields, "output_dir": str(tmp_path / "fast")}))
  slow = persona.run_dpo(common.derive(config, {**fields, "persona.fast": False, "output_dir": str(tmp_path / "slow")}))
  for fast_r, slow_r, full_r in zip(fast, slow, out["dpo"]):
    for key, value in fast_r.items():
      if isinstance(value, float):
        assert value == pytest.approx(slow_r[key], rel=1e-4, abs=1e-6), key
      else:
        assert value == slow_r[key], key
    assert fast_r["start"] == pytest.approx(full_r["start"], rel=1e-6)
    assert abs(fast_r["end"] - full_r["end"]) > 1e-4
    rows = {
        name: [m for m in metrics.read_metrics(str(tmp_path / name / f'seed_{fast_r["seed"]}')) if "monitor/loss" in m]
        for name in ("fast", "slow")
    }
    for key in ("monitor/preferred_prob", "monitor/preferred_logprob_change", "monitor/loss"):
      np.testing.assert_allclose(
          [m[key] for m in rows["fast"]], [m[key] for m in rows["slow"]], rtol=1e-4, atol=1e-6, err_msg=key
      )


def test_dpo_starts_from_the_sft_export(run_dir):
  """pi(No | prompt) at DPO step 0 equals the exported SFT model's next-token probability, computed here."""
  from displacement_jax import models

  config, out = run_dir
  model, params, _ = models.from_pretrained(out["sft"]["hf_dir"])
  from displacement_jax.models import tokenizer as tok_lib

  tok = tok_lib.load_tokenizer(out["sft"]["hf_dir"])
  r = out["dpo"][0]
  question = schema.load_persona_rows(config.persona.data_path)[r["prompt_row"]]["question"]
  ids = np.asarray([tokenize.prompt_ids(tok, question, format="persona")], np.int32)
  logits = model.apply({"params": params}, jnp.asarray(ids), jnp.ones(ids.shape, bool)).logits_BTV
  prob = float(jax.nn.softmax(logits[0, -1].astype(jnp.float32))[tok.get_vocab()["No"]])
  assert r["start"] == pytest.approx(prob, rel=1e-4, abs=1e-6)


def test_persona_report(run_dir, tmp_path, capsys):
  config, out = run_dir
  rep = report.report("persona", [config.output_dir], str(tmp_path))
  (row,) = rep["rows"]
  assert row["n_seeds"] == 2 and (row["preferred"], row["dispreferred"]) == ("No", "Never")
  assert row["largest_drop"] == pytest.approx(np.mean([r["largest_drop"] for r in out["dpo"]]))
  assert row["w_pos_norm_start"] == pytest.approx(np.mean([r["w_pos_norm_start"] for r in out["dpo"]]))
  assert "No/Never" in capsys.readouterr().out and os.path.getsize(rep["plots"][0]) > 1000
