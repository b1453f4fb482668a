"""The short runs behind the edit search and the demo (experiments/short_runs.py, edit_search.py) on the tiny Llama:
a short run equals `training.run` on the same config, and the search's table is its per-pair files."""

import json
import os
import sys

import jax
import numpy as np
from displacement_jax import training
from displacement_jax.experiments import edit_pairs, edit_search, short_runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import edit_search as search_config  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_a_short_run_equals_training_run(tmp_path):
  """Session.train (the batches and step of train.run on one loaded model) against training.run itself on the same
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


def test_the_topics_facts_are_distinct_and_right():
  """Every topic's answers are distinct (an edit never equals y+), the sums add up, and topic_rows re-indexes."""
  for name, topic in edit_pairs.TOPICS.items():
    values = [v for _, v in topic.facts]
    assert len(set(values)) == len(values), name
  assert len(edit_pairs.ELEMENTS) == len(edit_pairs.SUMS) == 88 and edit_pairs.ELEMENTS[78] == ("gold", "Au")
  for subject, value in edit_pairs.SUMS:
    a, b = subject.split(" plus ")
    assert int(a) + int(b) == int(value) and int(a) > 0 and int(b) > 0
  rows = edit_pairs.topic_rows("edit", ("capital", "symbol", "sum"))
  assert len(rows) == 256 and [r["index"] for r in rows] == list(range(256))
  assert rows[:80] == edit_pairs.rows("edit")  # the capital rows are the demo's, unchanged
  for r in rows:  # the same sentence with another fact's answer
    topic = edit_pairs.TOPICS[r["meta"].get("topic", "capital")]
    subject = r["meta"].get("subject", r["meta"].get("country"))
    others = {topic.answer.format(subject=subject, value=v) for _, v in topic.facts} - {r["chosen"]}
    assert r["rejected"] in others


def test_proof_grid_shares_one_replay_across_learning_rates(tmp_path):
  """grid=proof (tiny): every predictor's column, the scatter plot, and the second lr's predictions (D of the first
  lr scaled, `edit_search.Auditor`) equal a fresh audit at that lr."""
  config = search_config.get_config("tiny,grid=proof")
  config.output_dir = str(tmp_path)
  config.search.num_pairs = 4  # per topic: 12 pairs
  config.search.optimizers = ("rmsprop",)
  config.search.lrs = tuple(config.search.lrs[1:3])
  config.num_epochs = 1  # the audit predicts one epoch here (tiny sets 2)
  rows = edit_search.run(config)
  assert len(rows) == 2
  for name in edit_search.PREDICTORS:
    assert np.isfinite(rows[-1][f"spearman_{name}"]), name
  assert all(0 <= rows[-1][f"sign_{o}"] <= 1 for o in edit_search.AUDIT_ORDERS)
  assert (tmp_path / edit_search.SCATTER_PLOT).stat().st_size > 0
  lr = float(config.search.lrs[1])
  f = np.load(tmp_path / "pairs" / f'{edit_search.run_name("edit", "rmsprop", lr, "dpo")}.npz')
  session = short_runs.Session(config)
  dataset = edit_search.datasets_of(session, config)["edit"]
  fresh = session.audit(dataset, {"optim.name": "rmsprop", "optim.lr": lr}, order=2)
  for order in edit_search.AUDIT_ORDERS:
    np.testing.assert_allclose(f[f"predicted_{order}_2N"], fresh[order], rtol=1e-3, atol=1e-5, err_msg=order)
