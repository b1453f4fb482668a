"""The config of a plain train.loop.run of a short run's training (experiments/short_runs.Session), for tests that
compare the two: the session's config with the run's overrides, no monitor, no checkpoint, no reference cache."""

from __future__ import annotations

import os
from typing import Any, Mapping

import ml_collections


def train_run_config(
    session: Any, dataset: Any, overrides: Mapping[str, Any], out_dir: str
) -> ml_collections.ConfigDict:
  """`session.run_config` of `overrides` on `dataset`'s file, written to `out_dir`/train, for train.loop.run."""
  return session.run_config(
      {
          **overrides,
          "data.path": dataset.path,
          "main": "",
          "output_dir": os.path.join(str(out_dir), "train"),
          "eval.every": 0,
          "checkpoint.at_end": False,
          "reference.cache": False,
      }
  )
