"""The short runs behind the edit search and the demo (experiments/short_runs.py, edit_search.py) on the tiny Llama:
a short run equals `training.run` on the same config, and the search's table is its per-pair files."""

import json
import os
import sys

import jax
import numpy as np
from displacement_jax.train import loop as training
from displacement_jax.experiments import edit_pairs, edit_search, gainers, short_runs
from tests import short_run

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
  run_cfg = short_run.train_run_config(session, dataset, overrides, tmp_path)
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


def test_onpolicy_labels_put_the_stated_answer_first():
  """label_onpolicy: y+ is the sample that states the fact's answer when exactly one does (swapped if it was the
  second), else the first sample; the group says which case; answers match as whole words / numbers only."""
  facts = edit_pairs.topic_rows("edit", ("capital", "sum"), limit=2)
  assert edit_search.fact_value(facts[0]) == "Paris" and edit_search.fact_value(facts[2]) == "10"
  sampled = [
      {"index": 0, "prompt": "q0", "chosen": "It is Lyon.", "rejected": "Paris, of course."},
      {"index": 0, "prompt": "q0", "chosen": "Paris.", "rejected": "The capital is Paris."},
      {"index": 2, "prompt": "q2", "chosen": "It is 110.", "rejected": "It is 101."},
      {"index": 2, "prompt": "q2", "chosen": "3 plus 7 is 10.", "rejected": "It is 11."},
  ]
  rows = edit_search.label_onpolicy(facts, sampled)
  assert [(r["chosen"], r["rejected"], r["meta"]["group"]) for r in rows] == [
      ("Paris, of course.", "It is Lyon.", "right_over_wrong"),
      ("Paris.", "The capital is Paris.", "both_right"),
      ("It is 110.", "It is 101.", "both_wrong"),
      ("3 plus 7 is 10.", "It is 11.", "right_over_wrong"),
  ]
  assert [r["index"] for r in rows] == [0, 1, 2, 3]
  assert not edit_search.answer_stated("Scandium", "Sc") and edit_search.answer_stated("It is Sc.", "Sc")


def test_top_gainers_equal_a_direct_softmax_and_the_onpolicy_grid_runs(tmp_path):
  """The on-policy grid on the tiny Llama: two sampled responses per question, labelled and split into groups
  whose sub-rows partition the run's pairs; each run's top gainers equal a direct float32 softmax of the unpadded
  sequence before and after training (gainers.token_shift right-pads to a bucket); a second call resumes from
  the stored samples and per-pair files."""
  config = search_config.get_config("tiny,grid=onpolicy")
  config.output_dir = str(tmp_path)
  config.search.num_pairs = 4  # 12 questions
  config.search.optimizers, config.search.lrs, config.num_epochs = ("rmsprop",), (1e-2,), 1
  rows = edit_search.run(config)
  samples = [json.loads(line) for line in open(tmp_path / "data" / "onpolicy_samples.jsonl")]
  assert 0 < len(samples) <= 12 and all(r["chosen"] != r["rejected"] for r in samples)
  main, subs = rows[0], rows[1:]
  assert main["kind"] == "onpolicy" and all(r["kind"].startswith("onpolicy:") for r in subs)
  assert sum(r["n"] for r in subs) == len(samples)
  assert "top_gainers" in main and (main["top_gainers"] == "-") == (main["share_chosen_fell"] == 0)
  assert "top gainers" in (tmp_path / edit_search.RESULTS_MD).read_text()
  assert edit_search.run(config) == rows  # resumed: samples and the run read back

  session = short_runs.Session(config)
  dataset = session.dataset(samples, "check")
  measured = session.train(dataset, {"optim.name": "rmsprop", "optim.lr": 1e-2}, keep_params=True)
  pair = dataset.pairs[int(np.argmin(measured.chosen_change()))]
  probs_fn = gainers.make_probs_fn(session.loaded.model)
  shift = gainers.token_shift(probs_fn, session.params0, measured.params, pair.prompt_ids, pair.chosen_ids)
  ids = np.asarray(list(pair.prompt_ids) + list(pair.chosen_ids), np.int32)[None]
  for params, got in ((session.params0, shift.before_KV), (measured.params, shift.after_KV)):
    logits = session.loaded.model.apply({"params": params}, ids, np.ones(ids.shape, bool), return_logits=True)
    want = jax.nn.softmax(np.asarray(logits.logits_BTV, np.float32), axis=-1)[0, len(pair.prompt_ids) - 1 : -1]
    np.testing.assert_allclose(got, want, atol=1e-6)
  k = shift.worst_position()
  gain = shift.after_KV[k] - shift.before_KV[k]
  gain[pair.chosen_ids[k]] = -np.inf
  assert shift.top_gainers(1)[0][0] == int(np.argmax(gain))
