r"""Scoring CLI: score a preference dataset by CHES and the baselines, then optionally filter it (a leaf).

    python -m displacement_jax.score --config=configs/score_tiny.py
    python -m displacement_jax.score --config=configs/score_tiny.py --config.filter.mode=lowest_fraction \
        --config.filter.fraction=0.05

The measures and their exact positions are documented in displacement_jax.score.core.

Outputs in `output_dir`: scores.jsonl (one object per row, dataset order, with its `index`), summary.json
(count, mean, std and quantiles of each measure, truncation and suspicious-data counts), risky.jsonl (the
filter.top_k riskiest rows by filter.measure with row index, scores, ranks and excerpts, also printed),
ln_ches_hist.png (the filter's cutoff and the riskiest rows marked), and
with `filter.mode != 'none'`: filtered.jsonl (the selected original rows in the generic preference jsonl
schema, dataset order, ready for `displacement_jax.train`) and filtered_indices.json. run.json says "running"
until every output is written, then "complete"; each output is written to a temp file and renamed; a fresh run
first moves an earlier run's outputs to previous/; `--resume` continues an interrupted run from
scores.partial.jsonl (the rows of every finished batch).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from displacement_jax import rundir, runtime, sharding
from displacement_jax.config import flags as cli
from displacement_jax.config import checks as config_checks
from displacement_jax.score import filtering
from displacement_jax.score import core as scoring
from displacement_jax.score import outputs
from displacement_jax.data import checks as data_checks
from displacement_jax.data import schema
from displacement_jax.errors import UsageError


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


def run(config: ml_collections.ConfigDict, *, resume: bool = False) -> dict[str, Any]:
  """Load model + data, score every row, write the outputs; returns {'results', 'summary', 'filter'}.

  output_dir is locked for the run (rundir.hold: a second run exits 2). A fresh run moves an earlier run's outputs
  to previous/; `resume=True` continues an interrupted run from its last finished batch (same config and
  data, else a UsageError), and says so when that run is already complete.
  """
  config_checks.check_score(config)
  filter_cfg = config.get("filter", ml_collections.ConfigDict({"mode": "none"}))
  mesh = sharding.mesh_from_config(config.mesh, config.get("distributed"))
  primary = jax.process_index() == 0  # every host holds all results; one writes them
  os.makedirs(config.output_dir, exist_ok=True)
  with rundir.hold(config.output_dir, "score", enabled=primary):
    examples = load_examples(config)  # bad rows fail here, before the model is built
    checks = data_checks.check_examples(examples)
    for warning in checks.warnings(str(config.data.path)):
      print(warning, flush=True)
    identity = run_identity(config, examples)
    done = start_or_resume(config, identity, len(examples), resume=resume, primary=primary)
    if done is None:
      return {"results": None, "summary": None, "filter": None, "complete": True}
    try:
      results, summary, record = score_and_write(config, mesh, examples, checks, done, filter_cfg, primary)
    except Exception as e:
      if primary:
        rundir.write_run(config.output_dir, "failed", identity, error=str(e)[:1000])
      raise
    if not primary:
      return {"results": results, "summary": summary, "filter": None}
    rundir.write_run(config.output_dir, "complete", identity)
    os.remove(os.path.join(config.output_dir, outputs.PROGRESS_FILE))
  ln = summary["ln_ches"]
  print(
      f"scored {len(results)} pairs from {config.data.path} -> {config.output_dir}/{outputs.SCORES_FILE}; "
      f'LN-CHES mean {ln.get("mean", float("nan")):.4g} median '
      f'{ln.get("quantiles", {}).get("0.5", float("nan")):.4g}',
      flush=True,
  )
  if record is not None:
    dropped = record["dropped"]
    print(
        f'filter {record["mode"]} on {record["measure"]}: kept {record["num_selected"]} of {len(results)} rows -> '
        f"{config.output_dir}/{outputs.FILTERED_FILE}; dropped {len(dropped)} (0-based rows): "
        + (", ".join(map(str, dropped[:50])) + (" ..." if len(dropped) > 50 else "") if dropped else "none"),
        flush=True,
    )
  return {"results": results, "summary": summary, "filter": record}


def score_and_write(
    config: ml_collections.ConfigDict,
    mesh: Any,
    examples: Sequence[Any],
    checks: data_checks.DataChecks,
    done: dict[int, dict[str, Any]],
    filter_cfg: ml_collections.ConfigDict,
    primary: bool,
) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any] | None]:
  """(results, summary, filter record): the model loaded, the rows not in `done` scored (each finished batch
  appended to scores.partial.jsonl), and on process 0 the outputs written."""
  loaded = runtime.load_model(config, mesh)
  if primary:
    print(loaded.setup_line, flush=True)
  progress = outputs.Progress(config.output_dir) if primary else None
  try:
    results = scoring.score_examples(
        loaded.model,
        loaded.params,
        config,
        loaded.tokenizer,
        examples,
        batch_size=int(config.batch_size),
        mesh=mesh,
        done=done,
        on_batch=progress.append if progress else None,
    )
  finally:
    if progress:
      progress.close()
  summary = outputs.summarize(results)
  summary.update(
      data_path=config.data.path,
      model=config.model.get("path") or config.model.get("tiny"),
      format=loaded.identity["data_format"],
      vocab_size=int(loaded.model_config.vocab_size),
      added_tokens=loaded.identity["added_tokens"],
      max_length=int(config.data.max_length),
      devices=int(mesh.size),
      data_checks=checks.record(),
      resumed_rows=len(done),
  )
  selected = outputs.select_rows(results, filter_cfg) if filter_cfg.get("mode", "none") != "none" else None
  record = write_outputs(config, examples, results, summary, selected, filter_cfg) if primary else None
  return results, summary, record


# The config fields that decide the scores (by prefix): --resume refuses a change of any of them.
SCORE_FIELDS = ("model.", "data.", "batch_size", "seed", "measures.")


def run_identity(config: ml_collections.ConfigDict, examples: Sequence[Any]) -> dict[str, Any]:
  """What run.json records of a score run, and --resume compares: the config fields that decide the scores and
  the data (path, rows, sha256 of every row as loaded)."""
  fields = config_checks.flatten(json.loads(config.to_json_best_effort()))
  return {
      "config": {k: v for k, v in fields.items() if k.startswith(SCORE_FIELDS)},
      "data": {"path": str(config.data.path), "num_rows": len(examples), "sha256": rundir.hash_examples(examples)},
  }


def start_or_resume(
    config: ml_collections.ConfigDict, identity: dict[str, Any], num_rows: int, *, resume: bool, primary: bool
) -> dict[int, dict[str, Any]] | None:
  """{position: result} already scored ({} for a fresh run, whose earlier outputs are moved aside first), or
  None when --resume finds the run complete. run.json says 'running' from here on."""
  out = config.output_dir
  if not resume:
    if primary:
      moved = outputs.move_aside(out)
      if moved:
        print(f"moved the outputs of an earlier run ({', '.join(moved)}) to {out}/{outputs.PREVIOUS_DIR}/", flush=True)
      rundir.write_run(out, "running", identity)
    return {}
  try:
    record = rundir.read_run(out)
  except rundir.CorruptFileError as e:
    raise UsageError(f"--resume: {e}; cannot tell which run it was: score afresh (without --resume)") from e
  if record is None:
    raise UsageError(f"--resume: no score run to resume in {out} (no {rundir.RUN_FILE})")
  if record.get("status") == "complete":
    print(f"the score run in {out} is already complete ({rundir.RUN_FILE}); nothing to do", flush=True)
    return None
  old = {**record.get("config", {}), **{f"data:{k}": v for k, v in record.get("data", {}).items()}}
  new = {**identity["config"], **{f"data:{k}": v for k, v in identity["data"].items()}}
  changed = rundir.identity_changes(old, new)
  if changed and not config.get("resume_allow_changes"):
    raise UsageError(
        f"--resume: the config or data differ from the interrupted run in {out}: {'; '.join(changed)}. Score "
        "afresh (without --resume), or pass --config.resume_allow_changes=True to mix them anyway"
    )
  done = outputs.Progress.read(out, num_rows)
  print(f"resuming the score run in {out}: {len(done)} of {num_rows} rows already scored", flush=True)
  if primary:
    rundir.write_run(out, "running", identity)
  return done


def write_outputs(
    config: ml_collections.ConfigDict,
    examples: Sequence[Any],
    results: Sequence[dict[str, Any]],
    summary: dict[str, Any],
    selected: np.ndarray | None,
    filter_cfg: ml_collections.ConfigDict,
) -> dict[str, Any] | None:
  """scores.jsonl, risky.jsonl (the filter.top_k riskiest rows, also printed), summary.json, the histogram (the
  filter's cutoff and the riskiest rows marked) and (with a filter) the filtered files, each written to a temp file
  and renamed; returns the filter record."""
  out = config.output_dir
  os.makedirs(out, exist_ok=True)
  outputs.write_scores(results, os.path.join(out, outputs.SCORES_FILE))
  measure = filter_cfg.get("measure", "ln_ches")
  risky = outputs.riskiest(examples, results, int(filter_cfg.get("top_k", 10)), measure)
  outputs.write_risky(risky, os.path.join(out, outputs.RISKY_FILE))
  for line in outputs.risky_lines(risky, len(results), os.path.join(out, outputs.RISKY_FILE)):
    print(line, flush=True)
  cutoff = outputs.cutoff_of(results, selected, measure) if selected is not None else None
  outputs.plot_histogram(
      np.asarray([r[measure] for r in results]),
      os.path.join(out, outputs.HIST_FILE),
      title={"ln_ches": "LN-CHES", "ches": "CHES"}.get(measure, measure),
      cutoff=cutoff,
      flagged=[float(r[measure]) for r in results if int(r["index"]) in {x["row"] for x in risky}],
  )
  record = None
  if selected is not None:
    record = outputs.write_filtered(examples, results, selected, filter_cfg, out, cutoff)
  rundir.write_json(os.path.join(out, outputs.SUMMARY_FILE), summary)
  return record


# The config fields scoring does not read (training's): --help leaves them out.
SKIPPED_FIELDS = (
    "main",
    "num_epochs",
    "num_steps",
    "export_hf",
    "log_every",
    "overwrite",
    "loss.",
    "optim.",
    "checkpoint.",
    "eval.",
    "reference.",
    "debug.",
)


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry; returns 0, 1 (bad input, a failed run: one-line message on stderr) or 2 (bad flags, output_dir
  in use, a refused --resume)."""
  flag_values, status = cli.parse_config_flags(
      argv,
      "Scoring preference pairs by CHES, LN-CHES, edit distance and last-hidden inner product",
      bools=[("resume", "continue an interrupted run in output_dir from its last finished batch")],
      prog="displacement_jax.score",
      help_skip=(*SKIPPED_FIELDS, "audit."),  # the audit CLI's fields too
      help_extra="measures: " + ", ".join(scoring.MEASURES) + "; filter modes: " + ", ".join(filtering.MODES),
  )
  if flag_values is None:
    return status
  # sharding.reporting_failures: in a multi-process run an error here also ends the other processes.
  return cli.one_line_errors(sharding.reporting_failures(lambda: run(flag_values.config, resume=flag_values.resume)))


if __name__ == "__main__":
  sys.exit(main())
