"""The short runs behind the edit search and the demo (experiments/short_runs.py, edit_search.py) on the tiny Llama:
a short run equals `training.run` on the same config, and the search's table is its per-pair files."""

import json
import os
import sys

import jax
import numpy as np
from displacement_jax.train import loop as training
from displacement_jax.experiments import edit_pairs, edit_search, short_runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import edit_search as search_config  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_a_short_run_equals_training_run(tmp_path):
  """Session.train (the batches and step of train.loop.run on one loaded model) against training.run itself on the same
  config: equal per-pair log-probs after two epochs (measured with the same forward on both params)."""
  config = search_config.get_config("tiny")
  config.output_dir = str(tmp_path / "session")
  session = short_runs.Session(config)
  dataset = session.dataset(edit_pairs.rows("edit", limit=16), "edit")
  overrides = {"optim.name": "rmsprop", "optim.lr": 1e-3, "num_epochs": 2}
  measured = session.train(dataset, overrides, keep_params=True)
  run_cfg = session.run_config(
      {
          **overrides,
          "data.path": dataset.path,
          "main": "",
          "output_dir": str(tmp_path / "train"),
          "eval.every": 0,
          "checkpoint.at_end": False,
          "reference.cache": False,
      }
  )
  result = training.run(run_cfg)
  assert result.step == 2 * len(dataset.pairs) // 8
  chosen, rejected = session.logps(jax.device_put(result.params), dataset)
  np.testing.assert_allclose(measured.chosen_EN[-1], chosen, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(measured.rejected_EN[-1], rejected, rtol=1e-5, atol=1e-4)
  assert np.abs(measured.chosen_change()).max() > 1e-2  # the run moved the log-probs


def test_search_table_is_its_per_pair_files(tmp_path):
  config = search_config.get_config("tiny,grid=remedies")
  config.output_dir = str(tmp_path)
  config.search.num_pairs = 8
  config.num_epochs = 2
  rows = edit_search.run(config)
  assert [(r["variant"], r["epoch"]) for r in rows] == [(v, e) for v in ("dpo", "dpo+sft", "dpop") for e in (1, 2)]
  assert [json.loads(line) for line in open(tmp_path / edit_search.RESULTS_JSONL)] == rows
  table = (tmp_path / edit_search.RESULTS_MD).read_text().splitlines()
  assert len(table) == 2 + len(rows)
  for r in rows:
    f = np.load(tmp_path / "pairs" / f'{edit_search.run_name(r["kind"], r["optimizer"], r["lr"], r["variant"])}.npz')
    change = f["chosen_EN"][r["epoch"] - 1] - f["chosen_N"]
    np.testing.assert_allclose(r["chosen_change_mean"], change.mean(), rtol=1e-6)
    np.testing.assert_allclose(r["share_chosen_fell"], np.mean(change < 0))


def test_flatten_nested_overrides():
  assert short_runs.flatten({"loss": {"sft_coeff": 0.1}, "optim.lr": 1e-6}) == {"loss.sft_coeff": 0.1, "optim.lr": 1e-6}
  assert short_runs.flatten(search_config.get_config("tiny,grid=remedies").search.variants) == {
      "dpo+sft.loss.sft_coeff": 0.1,
      "dpop.loss.objective": "dpop",
  }
