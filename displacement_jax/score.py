r"""Scoring CLI: score a preference dataset by CHES and the baselines, then optionally filter it (a leaf).

    python -m displacement_jax.score --config=configs/score_tiny.py
    python -m displacement_jax.score --config=configs/score_tiny.py --config.filter.mode=lowest_fraction \
        --config.filter.fraction=0.05

The measures and their exact positions are documented in displacement_jax.scoring.

Outputs in `output_dir`: scores.jsonl (one object per row, dataset order, with its `index`), summary.json
(count, mean, std and quantiles of each measure), ln_ches_hist.png, and with `filter.mode != 'none'`:
filtered.jsonl (the selected original rows in the generic preference jsonl schema, dataset order, ready for
`displacement_jax.train`) and filtered_indices.json.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from displacement_jax import cli, config_checks, runtime, scoring, sharding
from displacement_jax import score_outputs as outputs
from displacement_jax.data import schema


def load_examples(config: ml_collections.ConfigDict) -> list[Any]:
  """Rows of config.data.path (data.schema, data.split); data.limit > 0 keeps a seeded random subset
  (data.seed) in dataset order, as the paper's 5000 random UltraFeedback rows."""
  dc = config.data
  limit = int(dc.get("limit", 0) or 0)
  return list(
      schema.load_preference_data(
          dc.path,
          split=dc.get("split") or None,
          schema=dc.get("schema", "auto"),
          limit=limit or None,
          seed=int(dc.get("seed", 0)),
      )
  )


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Load model + data, score every row, write the outputs; returns {'results', 'summary', 'filter'}."""
  config_checks.check_score(config)
  filter_cfg = config.get("filter", ml_collections.ConfigDict({"mode": "none"}))
  mesh = sharding.mesh_from_config(config.mesh)
  examples = load_examples(config)  # bad rows fail here, before the model is built
  loaded = runtime.load_model(config, mesh)
  results = scoring.score_examples(
      loaded.model,
      loaded.params,
      config,
      loaded.tokenizer,
      examples,
      batch_size=int(config.batch_size),
      max_length=int(config.data.max_length),
      format=config.data.format,
      mesh=mesh,
      progress=bool(config.get("progress", True)),
  )
  summary = outputs.summarize(results)
  summary.update(
      data_path=config.data.path,
      model=config.model.get("path") or config.model.get("tiny"),
      format=config.data.format,
      max_length=int(config.data.max_length),
      devices=int(mesh.size),
  )
  selected = outputs.select_rows(results, filter_cfg) if filter_cfg.get("mode", "none") != "none" else None
  if jax.process_index() != 0:  # every host holds all results; one writes them
    return {"results": results, "summary": summary, "filter": None}
  record = write_outputs(config, examples, results, summary, selected, filter_cfg)
  ln = summary["ln_ches"]
  print(
      f"scored {len(results)} pairs from {config.data.path} -> {config.output_dir}/{outputs.SCORES_FILE}; "
      f'LN-CHES mean {ln.get("mean", float("nan")):.4g} median '
      f'{ln.get("quantiles", {}).get("0.5", float("nan")):.4g}',
      flush=True,
  )
  if record is not None:
    print(
        f'filter {record["mode"]} on {record["measure"]}: kept {record["num_selected"]} of {len(results)} rows -> '
        f"{config.output_dir}/{outputs.FILTERED_FILE}",
        flush=True,
    )
  return {"results": results, "summary": summary, "filter": record}


def write_outputs(
    config: ml_collections.ConfigDict,
    examples: Sequence[Any],
    results: Sequence[dict[str, Any]],
    summary: dict[str, Any],
    selected: np.ndarray | None,
    filter_cfg: ml_collections.ConfigDict,
) -> dict[str, Any] | None:
  """scores.jsonl, summary.json, the histogram and (with a filter) the filtered files; returns the filter record."""
  os.makedirs(config.output_dir, exist_ok=True)
  outputs.write_scores(results, os.path.join(config.output_dir, outputs.SCORES_FILE))
  with open(os.path.join(config.output_dir, outputs.SUMMARY_FILE), "w") as f:
    json.dump(summary, f, indent=1)
  outputs.plot_histogram(
      np.asarray([r["ln_ches"] for r in results]), os.path.join(config.output_dir, outputs.HIST_FILE)
  )
  if selected is None:
    return None
  return outputs.write_filtered(examples, results, selected, filter_cfg, config.output_dir)


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry; returns 0, 1 (bad input: one-line message on stderr) or 2 (bad flags)."""
  flag_values, status = cli.parse_config_flags(
      argv,
      "Scoring preference pairs by CHES, LN-CHES, edit distance and last-hidden inner product",
      prog="displacement_jax.score",
      help_extra="measures: "
      + ", ".join(scoring.MEASURES)
      + "; filter modes: none, lowest_k, lowest_fraction, quantile_window",
  )
  if flag_values is None:
    return status
  return cli.one_line_errors(lambda: run(flag_values.config))


if __name__ == "__main__":
  sys.exit(main())
