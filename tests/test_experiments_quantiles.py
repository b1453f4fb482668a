"""Section 5 pipeline end to end on the tiny UltraFeedback fixture (parquet, HF layout, read by `datasets`)."""

import json
import os
import sys

import numpy as np
import pytest

from displacement_jax import report
from displacement_jax.score import filtering
from displacement_jax.train import metrics
from displacement_jax.data import schema
from displacement_jax.experiments import quantiles

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import ches_quantiles  # noqa: E402

# The tiny runs repeat the same jitted shapes: compile them once (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("xla_compilation_cache")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("quantiles")
  config = ches_quantiles.get_config("dataset=ultrafeedback,tiny")
  config.output_dir = str(out / "sweep" / "all")
  config.quantiles.measure = "all"
  config.quantiles.measures = ("ches",)
  config.quantiles.q = -1.0
  config.quantiles.quantiles = (0.0, 1.0)
  config.quantiles.seeds = (0,)
  results = quantiles.run(config)
  return config, results


def test_windows_follow_the_cached_scores(run_dir):
  config, results = run_dir
  examples = schema.load_preference_data(config.data.path, split=config.data.split)
  assert len(examples) == 12
  ches = {}
  for seed in (0,):
    seed_config = config.copy_and_resolve_references()
    seed_config.seed = seed
    path = quantiles.scores_cache_path(seed_config)
    assert os.path.dirname(path) == os.path.dirname(config.output_dir)
    assert os.path.basename(path).startswith(f"scores_seed{seed}_")
    with np.load(path) as f:
      np.testing.assert_array_equal(f["index"], np.arange(12))
      ches[seed] = f["ches"]
    assert np.all(np.isfinite(ches[seed])) and len(set(ches[seed].tolist())) == 12
  for r in results:  # each seed trains the window of the scores under its own (seeded) new-token init
    window = filtering.quantile_window(ches[r["seed"]], r["q"], 4)
    assert r["dataset_rows"] == [int(examples[i].index) for i in window]
    d = os.path.join(config.output_dir, f'ches_q{r["q"]:g}_seed{r["seed"]}')
    with open(os.path.join(d, "subset.jsonl")) as f:
      rows = [json.loads(l) for l in f]
    assert [row["meta"]["source_index"] for row in rows] == r["dataset_rows"] and r["n"] == 4
  ches = ches[0]
  lo = [r for r in results if r["seed"] == 0 and r["q"] == 0.0][0]
  hi = [r for r in results if r["seed"] == 0 and r["q"] == 1.0][0]
  order = np.argsort(ches, kind="stable")
  assert lo["dataset_rows"] == order[:4].tolist() and hi["dataset_rows"] == order[-4:].tolist()


def test_result_is_the_final_monitor_row_and_report(run_dir, tmp_path):
  config, results = run_dir
  assert sorted((r["q"], r["seed"]) for r in results) == [(0.0, 0), (1.0, 0)]
  for r in results:
    d = os.path.join(config.output_dir, f'ches_q{r["q"]:g}_seed{r["seed"]}')
    last = [m for m in metrics.read_metrics(d) if "monitor/preferred_logprob_change" in m][-1]
    assert last["step"] == r["steps"] == 2  # 4 rows, batch 2, one epoch
    assert r["preferred_logprob_change"] == last["monitor/preferred_logprob_change"]
    assert r["preferred_logprob_change"] != 0.0
  out = report.report("quantiles", [config.output_dir], str(tmp_path))
  for row in out["rows"]:
    vals = [r["preferred_logprob_change"] for r in results if r["q"] == row["q"]]
    assert row["mean"] == pytest.approx(np.mean(vals)) and row["min"] == min(vals) and row["max"] == max(vals)
  assert os.path.getsize(tmp_path / "quantiles.png") > 1000


def test_scores_cache_is_reused(run_dir, capsys):
  config, _ = run_dir
  examples = schema.load_preference_data(config.data.path, split=config.data.split)
  cached = quantiles.compute_scores(config, examples)  # config.seed = 0: the seed-0 cache
  assert "reusing scores" in capsys.readouterr().out
  with np.load(quantiles.scores_cache_path(config)) as f:
    np.testing.assert_array_equal(cached["ches"], f["ches"])
  other = config.copy_and_resolve_references()
  other.data.max_length = 48  # anything the scores depend on gives another cache file
  assert quantiles.scores_cache_path(other) != quantiles.scores_cache_path(config)
