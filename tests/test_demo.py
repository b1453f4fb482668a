"""README's first command (configs/demo.py) end to end on the tiny random Llama, through `train.main` like the README
command, and on the base install (torch unimportable). The packaged SmolLM2 run is checked by docs/outputs.py."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from displacement_jax.experiments import demo
from displacement_jax.train import main as train_lib
from displacement_jax.experiments import edit_pairs
from displacement_jax.experiments.results import sign_agreement, spearman

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_PAIRS = 16


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("demo")
  rc = train_lib.main(
      ["train", f'--config={os.path.join(ROOT, "configs", "demo.py")}:tiny', f"--config.output_dir={out}"]
  )
  assert rc == 0
  return str(out)


def test_outputs_exist_and_the_summary_is_the_per_pair_file(demo_run):
  for name in (demo.SUMMARY_FILE, demo.PAIRS_FILE, demo.PLOT_FILE):
    assert os.path.getsize(os.path.join(demo_run, name)) > 0, name
  with open(os.path.join(demo_run, demo.PLOT_FILE), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  summary = json.load(open(os.path.join(demo_run, demo.SUMMARY_FILE)))
  pairs = np.load(os.path.join(demo_run, demo.PAIRS_FILE))
  assert summary["num_pairs"] == NUM_PAIRS and set(summary["runs"]) == {"DPO", "dpo+sft", "dpop"}
  for name, s in summary["runs"].items():
    change = pairs[f"chosen_after_{name}_N"] - pairs["chosen_start_N"]
    rejected = pairs[f"rejected_after_{name}_N"] - pairs["rejected_start_N"]
    np.testing.assert_allclose(s["chosen_change_mean"], change.mean(), rtol=1e-5)
    np.testing.assert_allclose(s["share_chosen_fell"], np.mean(change < 0))
    np.testing.assert_allclose(s["margin_change_mean"], (change - rejected).mean(), rtol=1e-5, atol=1e-6)
  measured = pairs["chosen_after_DPO_N"] - pairs["chosen_start_N"]
  np.testing.assert_allclose(summary["spearman"]["along_direction"], spearman(pairs["along_direction_2N"][0], measured))
  np.testing.assert_allclose(summary["spearman"]["minus_ches"], spearman(-pairs["ches_N"], measured))
  np.testing.assert_allclose(
      summary["sign_agreement"]["first_order"], sign_agreement(pairs["first_order_2N"][0], measured)
  )
  mass = summary["mass"]
  assert len(mass["tokens"]) == len(mass["p_before"]) == len(mass["p_after"])
  assert 0 <= mass["worst_position"] < len(mass["tokens"])


def test_the_edit_pairs_differ_only_in_the_capital():
  rows = edit_pairs.rows("edit", seed=0, limit=NUM_PAIRS)
  for r in rows:
    head = f"The capital of {r['meta']['country']} is "
    assert r["chosen"] == head + r["meta"]["capital"] + "."
    assert r["rejected"].startswith(head) and r["rejected"] != r["chosen"]
    assert r["rejected"][len(head) : -1] in {c for _, c in edit_pairs.CAPITALS}
  assert rows == edit_pairs.rows("edit", seed=0, limit=NUM_PAIRS)  # seeded
  para = edit_pairs.rows("paraphrase", limit=3)
  assert para[0]["rejected"] == "Paris is the capital of France."
  off = edit_pairs.rows("offpolicy", limit=3)
  assert all(r["rejected"].startswith("The capital of ") and r["meta"]["country"] not in r["rejected"] for r in off)
  with pytest.raises(ValueError, match="kind must be one of"):
    edit_pairs.rows("typo")


def test_demo_imports_no_torch(tmp_path):
  """README's first command runs on the base install (no torch): torch made unimportable changes nothing."""
  script = (
      "import sys\n"
      "sys.modules['torch'] = None  # any `import torch` now raises ImportError\n"
      "from displacement_jax.train import main as train\n"
      f"rc = train.main(['train', '--config={os.path.join(ROOT, 'configs', 'demo.py')}:tiny', "
      f"'--config.output_dir={tmp_path}', '--config.demo.num_pairs=8'])\n"
      "loaded = [m for m, v in sys.modules.items() if m.split('.')[0] == 'torch' and v is not None]\n"
      "print('torch modules loaded:', loaded)\n"
      "sys.exit(rc or (3 if loaded else 0))\n"
  )
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=900)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  assert "torch modules loaded: []" in result.stdout
  assert os.path.exists(tmp_path / demo.SUMMARY_FILE)
