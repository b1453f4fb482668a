"""What a DPO run shows (issue 30, item 5): the pairs whose ln pi(y+) fell named by row, warnings on the share of
pairs and on a fall from the peak (not only on the mean), and output_dir/displacement.png written at every eval."""

from __future__ import annotations

import os

import numpy as np

from configs import dpo_tiny
from displacement_jax.train import metrics
from displacement_jax import displacement as monitor
from displacement_jax.train import plot as train_plot
from displacement_jax.train import loop as training
from displacement_jax.train import resume as resume_lib


def test_fallen_pairs_names_the_rows_most_fallen_first():
  out = monitor.fallen_pairs(np.array([0.5, -2.0, -0.1, -3.0]), np.array([-10.0] * 4), [10, 11, 12, 13], 2)
  assert out == {"monitor/fell_rows": [13, 11], "monitor/fell_changes": [-3.0, -2.0]}
  assert monitor.fallen_pairs(np.array([1e-6]), np.array([-1.0]), [0], 5)["monitor/fell_rows"] == []  # noise floor
  line = monitor.format_line(3, {"monitor/loss": 0.6, **out})
  assert line.endswith("y+ fell most: row 13 (-3), row 11 (-2)")


def test_share_and_peak_warnings():
  # half the pairs lost chosen likelihood at step 1 while the mean rose: the share warns
  (w,) = monitor.share_and_peak_warnings(1, 0.5, +0.3, None, None)
  assert w == (
      "WARNING likelihood displacement at step 1: the preferred log-prob fell for 50% of the monitored pairs "
      "(eval.warning_share=0.25)"
  )
  # the mean fell from a peak of +9.07 to +7.57 (the trial): the peak warns
  (w,) = monitor.share_and_peak_warnings(30, 0.1, 7.57, 0.1, 9.07)
  assert "fell from its peak +9.07 to +7.57 (more than eval.warning_drop_nats=1)" in w
  assert monitor.share_and_peak_warnings(2, 0.2, 0.5, 0.1, 1.0) == []  # below both thresholds
  assert monitor.share_and_peak_warnings(2, 0.3, 0.5, 0.4, 1.0) == []  # the share shrinks: said already


def test_a_tiny_run_writes_the_plot_and_names_fallen_rows(tmp_path, capsys):
  config = dpo_tiny.get_config()
  config.output_dir, config.progress, config.num_steps, config.eval.every = str(tmp_path), False, 4, 2
  config.checkpoint.every, config.eval.warning_share = 0, 0.0  # warn at any share, to see the line
  training.run(config)
  out = capsys.readouterr().out
  assert os.path.getsize(tmp_path / train_plot.PLOT_FILE) > 5000
  rows = [r for r in metrics.read_metrics(str(tmp_path)) if "monitor/fell_rows" in r]
  assert [r["step"] for r in rows] == [0, 2, 4]
  assert all(len(r["monitor/fell_rows"]) <= 5 for r in rows)
  assert "the preferred log-prob fell for" in out
  fallen = [r for r in rows if r["monitor/fell_rows"]]
  if fallen:
    assert f"y+ fell most: row {fallen[0]['monitor/fell_rows'][0]} (" in out


def test_checkpoint_size_is_said_at_start_and_one_is_kept_by_default():
  from configs import base

  config = base.get_base_config()
  assert config.checkpoint.keep == 1  # only what --resume needs: a resume that adds a step does not double the dir
  state = {"params": np.zeros((256, 1024), np.float32), "opt": np.zeros((256, 1024), np.float32)}
  line = resume_lib.checkpoint_size_line(state, config, total_steps=3)
  assert line.startswith("checkpoints: 2 MiB each (params + optimizer state), 1 to write, the newest 1 kept")
  config.checkpoint.at_end = False
  assert resume_lib.checkpoint_size_line(state, config, 3).startswith("checkpoints: none")
