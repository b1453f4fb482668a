"""The theory check and the generated pairs on the tiny random Llama, through `train.main` like the README commands;
the statistics helpers against scipy."""

import json
import os

import numpy as np
import pytest
import scipy.stats

from displacement_jax.train import main as train_lib
from displacement_jax.experiments import generated_pairs, results, theory_check
from displacement_jax.experiments.sorry_bench import generation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(config: str, *flags: str) -> int:
  return train_lib.main(
      ["train", f"--config={os.path.join(ROOT, 'configs', config)}", "--config.progress=False", *flags]
  )


def _read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def test_spearman_and_sign_agreement_against_scipy():
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=40), rng.normal(size=40)
  x[:5] = x[5]  # ties
  np.testing.assert_allclose(results.spearman(x, y), scipy.stats.spearmanr(x, y).statistic, rtol=1e-12)
  np.testing.assert_allclose(results.ranks([3.0, 1.0, 3.0, 2.0]), scipy.stats.rankdata([3, 1, 3, 2]) - 1)
  assert np.isnan(results.spearman([1.0, 1.0], [0.0, 1.0]))
  assert results.sign_agreement([1.0, -2.0, 0.5, -1.0], [0.1, -0.3, -0.2, 0.0]) == 0.5


def test_theory_check_tiny(tmp_path):
  assert _main("theory_check.py:tiny", f"--config.output_dir={tmp_path}") == 0
  rows = _read_jsonl(os.path.join(tmp_path, theory_check.PAIRS_FILE))
  summary = json.load(open(os.path.join(tmp_path, theory_check.SUMMARY_FILE)))
  words = ("Yes", "No", "Never", "Maybe")
  assert [(r["y_pos"], r["y_neg"]) for r in rows] == [(a, b) for a in words for b in words if a != b]
  assert summary["pairs"] == len(rows) == 12
  for pred in ("theorem1_rate", "network_rate"):
    x = [r[pred] for r in rows]
    y = [r["measured_change"] for r in rows]
    assert summary[f"{pred}/measured_change/sign_agreement"] == results.sign_agreement(x, y)
    np.testing.assert_allclose(summary[f"{pred}/measured_change/spearman"], scipy.stats.spearmanr(x, y).statistic)
  # the general identity: network(+,-) + network(-,+) = -l' |g+ - g-|^2 >= 0 (l' < 0 at the start of DPO)
  net = {(r["y_pos"], r["y_neg"]): r["network_rate"] for r in rows}
  assert all(net[a, b] + net[b, a] >= -1e-6 * (abs(net[a, b]) + abs(net[b, a])) for a, b in net)
  # the answer words' mass after SFT (its own jitted pass) holds at least pi(y+) of the checked candidates (every
  # one an answer word) at the start of their DPO runs (the DPO loop's log-softmax), and at most 1
  start = {r["y_pos"]: r["preferred_prob_start"] for r in rows}
  mass = summary["answer_mass_after_sft_checked"][0]
  assert sum(start.values()) - 1e-5 <= mass <= 1.0 + 1e-6, (start, mass)
  with open(os.path.join(tmp_path, theory_check.PLOT_FILE), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("pairs")
  assert _main("generate_pairs.py:tiny", f"--config.output_dir={out}") == 0
  return str(out)


def test_generated_pairs_tiny(pairs_dir):
  rows = _read_jsonl(os.path.join(pairs_dir, generated_pairs.PAIRS_FILE))
  summary = json.load(open(os.path.join(pairs_dir, generated_pairs.SUMMARY_FILE)))
  assert summary["prompts"] == 8 and summary["pairs"] + summary["left_out"] == 8 and len(rows) == summary["pairs"]
  assert rows, "no pair sampled"
  for r in rows:
    assert r["prompt"] == generated_pairs.PROMPTS[r["index"]]
    assert r["chosen"].strip() and r["rejected"].strip() and r["chosen"].strip() != r["rejected"].strip()
  assert len(set(generated_pairs.PROMPTS)) == len(generated_pairs.PROMPTS) == 512


def test_sample_pairs_redraws_equal_and_empty():
  calls = []

  def generator(prompts, *, temperature, max_new_tokens, seed):
    calls.append((list(prompts), seed))
    if len(calls) == 1:
      return ["a", "same", "", "x"]
    if len(calls) == 2:
      return ["b", "same", "c", "x"]
    return ["x" if p == "p3" else "redrawn" for p in prompts]  # p3 comes out equal again at every redraw

  pairs, left_out = generation.sample_pairs(
      generator, ["p0", "p1", "p2", "p3"], temperature=1.0, max_new_tokens=4, seed=0, max_tries=3
  )
  assert calls[2][0] == ["p1", "p2", "p3"]  # equal (p1, p3) and empty (p2) are drawn again
  by_prompt = {p["prompt"]: p for p in pairs}
  assert by_prompt["p0"] == {"index": 0, "prompt": "p0", "chosen": "a", "rejected": "b"}
  assert by_prompt["p1"]["rejected"] == "redrawn" and by_prompt["p2"]["chosen"] == "redrawn"
  assert left_out == 1 and "p3" not in by_prompt  # still equal after the last try: left out and counted


def test_quantiles_on_generated_pairs_tiny(pairs_dir, tmp_path):
  """configs/ches_quantiles.py:dataset=generated reads the sampled pairs (generic jsonl) and runs the windows."""
  import sys  # pylint: disable=g-import-not-at-top

  sys.path.insert(0, ROOT)
  from configs import ches_quantiles  # pylint: disable=g-import-not-at-top
  from displacement_jax.experiments import quantiles  # pylint: disable=g-import-not-at-top

  config = ches_quantiles.get_config("dataset=generated,tiny")
  assert config.data.path == "runs/generated_pairs_tiny/pairs.jsonl"
  config.data.path = os.path.join(pairs_dir, generated_pairs.PAIRS_FILE)
  config.output_dir = str(tmp_path / "sweep" / "all")
  config.quantiles.measure, config.quantiles.measures, config.quantiles.q = "all", ("ches",), -1.0
  config.quantiles.quantiles, config.quantiles.seeds, config.quantiles.window = (0.0, 1.0), (0,), 2
  results = quantiles.run(config)
  assert len(results) == 2
  real = ches_quantiles.get_config("dataset=generated,model=smollm2")
  assert (real.data.path, real.quantiles.window, real.data.format, real.data.add_special_tokens) == (
      "runs/generated_pairs/pairs.jsonl",
      64,
      "chat_template",
      False,
  )


def test_theory_check_lora_rates_predict_one_sgd_step(tmp_path):
  """LoRA (rank 4, q_proj,v_proj): every pair's DPO trains fresh adapters on the merged SFT model, and the network
  rate is over those adapters: one small SGD step changes ln pi(y+) by lr x the rate (first order), pair by pair,
  for the 12 pairs (B starts at zero, so the adapters' Gram is B's: A's gradient vanishes)."""
  lr = 0.05
  flags = ["--config.model.lora.rank=4", "--config.model.lora.target_modules=q_proj,v_proj"]
  flags += ["--config.optim.name=sgd", f"--config.dpo.lr={lr}", "--config.dpo.num_steps=1", "--config.sft.num_steps=2"]
  assert _main("theory_check.py:tiny", f"--config.output_dir={tmp_path}", *flags) == 0
  rows = _read_jsonl(os.path.join(tmp_path, theory_check.PAIRS_FILE))
  assert len(rows) == 12 and os.path.isdir(os.path.join(tmp_path, "sft", "adapter"))
  predicted = lr * np.array([r["network_rate"] for r in rows])
  measured = np.array([r["measured_change_step1"] for r in rows])
  assert np.abs(measured).min() > 1e-5
  np.testing.assert_allclose(measured, predicted, rtol=0.05)
