r"""Audit CLI: before training, predict per pair how the configured run moves ln pi(y+) and ln pi(y-) (a leaf).

    python -m displacement_jax.audit --config=configs/dpo_tiny.py
    python -m displacement_jax.audit --config=configs/dpo.py --config.data.path=my_pairs.jsonl --config.optim.lr=1e-6

It takes the config `train` takes (model, data, objective, beta, optimizer, lr, batch size, epochs, seed) and runs
the replay route of the displacement audit (displacement_jax/audit/replay.py): the run's batches replayed at the
initial parameters through its optimizer, the updates summed into D; per pair the first-order change
<grad ln pi, D>, the second-order change (+ D^T H D / 2; `audit.order` 1 skips it) and the change of the model
at theta0 + D. A pair is flagged when the model at theta0 + D puts
its ln pi(y+) below the start (the order that followed the measured falls on the real model: docs/results.md).

LoRA (config.model.lora.rank > 0 or .path): the audited run trains only the adapters (fp32) on the fixed base
params, so D, the derivatives, theta0 + D and the decomposition's per-pair gradients are all w.r.t. the adapters
(the base a constant: `models.lora.full_params`), the reference is training's (the base model); `audit.subspace`
'all' is every LoRA factor, 'head_and_last_layers' the adapters of the last `audit.last_layers` layers. Adapter
dropout is refused (exit 2: `short_runs.check_auditable`).

With `audit.decompose` (the default) it also splits each pair's first order into its own term and the other
pairs' (displacement_jax/audit/decompose.py, on `audit.subspace` through the projection `audit.sketch` of dimension
`audit.sketch_dim`): who pushes whom.

Outputs in `output_dir`: audit.jsonl (one row per pair, dataset order: its 0-based `row`, `index`, the predicted
changes of ln pi(y+) and ln pi(y-) by order, `flag`; with the decomposition `chosen_own`, `chosen_others`,
`rejected_own`, `rejected_others`, `top_contributors` (the rows pushing its ln pi(y+) down most, with their
contributions) and `displaced_by` ('others', 'own' or 'none': the first-order flag)) and audit_summary.json; the
`audit.top_k` pairs predicted to fall most are printed with excerpts. Every row also carries the audit's risk
scores (`filtering.audit_scores`: `audit_fall`, and with the decomposition `audit_own_fall`, `audit_others_fall`).

With `audit.filter.mode` (e.g. drop_highest_fraction on `audit.filter.measure` = audit_others_fall: drop the pairs
the others push down most) it also writes filtered.jsonl (the kept rows, ready for `train`) and
filtered_indices.json, as `score`'s CHES filters do.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Sequence

import ml_collections
import numpy as np

from displacement_jax import rundir, runtime, sharding
from displacement_jax.audit import decompose
from displacement_jax.config import checks as config_checks
from displacement_jax.config import flags as cli
from displacement_jax.score import filtering
from displacement_jax.score import outputs as score_outputs
from displacement_jax.data import schema
from displacement_jax.models import lora
from displacement_jax.experiments import short_runs

ROWS_FILE, SUMMARY_FILE = "audit.jsonl", "audit_summary.json"
TOP_K = 10


def _log(msg: str) -> None:
  print(msg, flush=True)


def _fmt(x: float | None) -> str:
  return "n/a" if x is None else f"{x:.3f}"


def excerpt(text: Any, n: int = 60) -> str:
  """A one-line excerpt of a prompt or response (chat messages: the last one's content)."""
  s = text if isinstance(text, str) else (text[-1]["content"] if text else "")
  s = " ".join(str(s).split())
  return s if len(s) <= n else s[: n - 3] + "..."


def pair_rows(
    pred: dict[str, np.ndarray], dataset: runtime.Dataset, parts: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
  """audit.jsonl: per pair the predictions of each order for y+ and y-, and the flag (at theta0 + D, y+ falls);
  with the decomposition `parts` (`decomposition_parts`) its own and others' terms, top contributors and
  `displaced_by`."""
  rows = []
  for i, pair in enumerate(dataset.pairs):
    row = {"row": i, "index": int(pair.index)}
    for order in (o for o in ("first_order", "second_order", "along_direction", "curvature") if o in pred):
      row[f"chosen_{order}"] = float(pred[order][0, i])
      row[f"rejected_{order}"] = float(pred[order][1, i])
    row["flag"] = bool(pred["along_direction"][0, i] < 0)
    if parts is not None:
      for side in ("chosen", "rejected"):
        row[f"{side}_own"] = float(parts[side]["own"][i])
        row[f"{side}_others"] = float(parts[side]["others"][i])
      row["top_contributors"] = [
          {"row": int(j), "contribution": float(v)}
          for j, v in zip(parts["chosen"]["top_rows"][i], parts["chosen"]["top_values"][i])
          if j >= 0
      ]
      row["displaced_by"] = parts["displaced_by"][i]
    rows.append(row)
  return rows


def decomposition_parts(info: dict[str, Any]) -> dict[str, Any]:
  """Own / others / top contributors of y+ and y- and the first-order flag from `Session.audit_decomposed`'s info."""
  top = info["settings"].top_contributors
  parts = {side: decompose.split(info[side], top) for side in ("chosen", "rejected")}
  parts["displaced_by"] = decompose.displaced_by(parts["chosen"]["own"], parts["chosen"]["others"])
  return parts


def agreement(estimate_N: np.ndarray, exact_N: np.ndarray) -> dict[str, float | None]:
  """{'corr', 'rel_error'}: Pearson correlation and |estimate - exact|_2 / |exact|_2 over the pairs."""
  corr = float(np.corrcoef(estimate_N, exact_N)[0, 1]) if len(exact_N) > 1 else None
  return {"corr": corr, "rel_error": float(np.linalg.norm(estimate_N - exact_N) / np.linalg.norm(exact_N))}


def decomposition_summary(
    rows: list[dict[str, Any]], info: dict[str, Any], config: ml_collections.ConfigDict
) -> dict[str, Any]:
  """The decomposition's settings, cost (against one epoch of training: the replay, one backward per batch, is
  that epoch's gradient work; both include their compile), how well own + others reproduces the replay's first
  order (exact only with sketch 'none' on subspace 'all') and the first order along D restricted to the subspace
  (what it estimates: the projection's error alone), the flags' shares and the pairs most often among the top
  contributors."""
  s = info["settings"]
  total = np.array([r["chosen_own"] + r["chosen_others"] for r in rows])
  first = np.array([r["chosen_first_order"] for r in rows])
  epoch_s = info["replay_s"] / max(int(config.num_epochs), 1)
  counts: dict[int, int] = {}
  for r in rows:
    for c in r["top_contributors"]:
      counts[c["row"]] = counts.get(c["row"], 0) + 1
  pushers = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_K]
  flags = [r["displaced_by"] for r in rows]
  return {
      "subspace": s.subspace,
      "last_layers": s.last_layers,
      "subspace_size": int(info["subspace_size"]),
      "sketch": s.sketch,
      "sketch_dim": s.sketch_dim if s.sketch != "none" else int(info["subspace_size"]),
      "replay_seconds": float(info["replay_s"]),
      "decomposition_seconds": float(info["pairs_s"]),
      "decomposition_cost_vs_one_epoch": float(info["pairs_s"] / epoch_s) if epoch_s > 0 else None,
      "own_plus_others_vs_first_order_corr": agreement(total, first)["corr"],
      "own_plus_others_vs_first_order_max_abs_diff": float(np.max(np.abs(total - first))),
      "own_plus_others_vs_first_order_rel_error": agreement(total, first)["rel_error"],
      **{
          f"own_plus_others_vs_subspace_first_order_{name}": value
          for name, value in agreement(total, np.asarray(info["subspace_first_order"][0])).items()
      },
      "share_displaced_by_others": float(np.mean([f == "others" for f in flags])),
      "share_displaced_by_own": float(np.mean([f == "own" for f in flags])),
      "chosen_own_mean": float(np.mean([r["chosen_own"] for r in rows])),
      "chosen_others_mean": float(np.mean([r["chosen_others"] for r in rows])),
      "top_pushers": [{"row": j, "times_top_contributor": n} for j, n in pushers],
  }


def summarize(rows: list[dict[str, Any]], config: ml_collections.ConfigDict) -> dict[str, Any]:
  first = np.array([r["chosen_first_order"] for r in rows])
  along = np.array([r["chosen_along_direction"] for r in rows])
  return {
      "num_pairs": len(rows),
      "optimizer": str(config.optim.name),
      "lr": float(config.optim.lr),
      "batch_size": int(config.batch_size),
      "num_epochs": int(config.num_epochs),
      "objective": str(config.loss.objective),
      "lora_rank": int(config.model.lora.get("rank", 0) or 0) if config.model.get("lora") else 0,
      "chosen_first_order_mean": float(first.mean()),
      **(
          {"chosen_second_order_mean": float(np.mean([r["chosen_second_order"] for r in rows]))}
          if rows and "chosen_second_order" in rows[0]
          else {}
      ),
      "chosen_along_direction_mean": float(along.mean()),
      "share_flagged": float(np.mean(along < 0)),
      "share_first_order_falls": float(np.mean(first < 0)),
  }


def filter_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict | None:
  """config.audit.filter when its mode is not 'none' (checked: a mode of filtering.MODES, an audit measure that
  this run computes), else None."""
  f = config.get("audit", {}).get("filter")
  if f is None or f.get("mode", "none") == "none":
    return None
  if f.mode not in filtering.MODES:
    raise ValueError(f"config.audit.filter.mode must be one of {filtering.MODES}, got {f.mode!r}")
  measures = filtering.AUDIT_MEASURES if config.audit.get("decompose", False) else ("audit_fall",)
  if f.get("measure") not in measures:
    raise ValueError(
        f"config.audit.filter.measure must be one of {measures}"
        f"{'' if config.audit.get('decompose', False) else ' (own / others need audit.decompose=True)'}, got "
        f"{f.get('measure')!r}"
    )
  return f


def add_scores(rows: list[dict[str, Any]]) -> None:
  """Adds the audit's risk scores (`filtering.audit_scores`) to every row."""
  decomposed = bool(rows) and "chosen_own" in rows[0]
  scores = filtering.audit_scores(
      [r["chosen_along_direction"] for r in rows],
      [r["chosen_own"] for r in rows] if decomposed else None,
      [r["chosen_others"] for r in rows] if decomposed else None,
  )
  for i, r in enumerate(rows):
    r.update({m: float(v[i]) for m, v in scores.items()})


def write_filter(
    rows: list[dict[str, Any]], examples: dict[int, Any], f: ml_collections.ConfigDict, output_dir: str
) -> dict[str, Any]:
  """filtered.jsonl + filtered_indices.json of the audited rows selected by `f` (`score_outputs.write_filtered`)."""
  selected = score_outputs.select_rows(rows, f, filtering.AUDIT_MEASURES, "config.audit.filter")
  missing = [r["index"] for r in rows if r["index"] not in examples]
  if missing:
    raise ValueError(f"audit.filter: rows with index {missing[:5]} of the dataset are not in the data file")
  cutoff = score_outputs.cutoff_of(rows, selected, f.measure)
  return score_outputs.write_filtered([examples[r["index"]] for r in rows], rows, selected, f, output_dir, cutoff)


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Audit the run `config` would make; returns the summary (written with the per-pair rows to output_dir)."""
  config_checks.check_train(config)
  if int(config.num_steps) > 0:
    raise ValueError("config.num_steps > 0: the audit replays whole epochs; set num_epochs instead (num_steps=0)")
  short_runs.check_auditable(config)  # LoRA: no adapter dropout
  filter_cfg = filter_config(config)
  os.makedirs(config.output_dir, exist_ok=True)
  session = short_runs.Session(config)
  dataset = runtime.load_data(config, session.loaded.tokenizer, session.loaded.model_config.vocab_size)
  _log(
      f"[audit] {len(dataset.pairs)} pairs of {config.data.path}; the run: {config.loss.objective} beta "
      f"{config.loss.beta:g}, {config.optim.name} lr {float(config.optim.lr):g}, batch {config.batch_size}, "
      f"{config.num_epochs} epoch(s); trained: "
      + (
          f"the LoRA adapters (r{session.lora.rank}, {lora.count(session.params0)} parameters)"
          if session.lora
          else "all"
      )
  )
  order = int(config.get("audit", {}).get("order", 2))
  if bool(config.get("audit", {}).get("decompose", False)):
    pred, info = session.audit_decomposed(dataset, {}, order=order)
    rows = pair_rows(pred, dataset, decomposition_parts(info))
    summary = summarize(rows, config)
    summary["decomposition"] = decomposition_summary(rows, info, config)
  else:
    rows = pair_rows(session.audit(dataset, {}, order=order), dataset)
    summary = summarize(rows, config)
  add_scores(rows)
  rundir.write_jsonl(os.path.join(config.output_dir, ROWS_FILE), rows)
  rundir.write_json(os.path.join(config.output_dir, SUMMARY_FILE), summary)
  n = len(rows)
  _log(
      f"[audit] predicted d ln pi(y+): first order mean {summary['chosen_first_order_mean']:+.4f} (falls for "
      f"{round(summary['share_first_order_falls'] * n)}/{n}); the model at theta0 + D mean "
      f"{summary['chosen_along_direction_mean']:+.4f} (falls for {round(summary['share_flagged'] * n)}/{n}: flagged)"
  )
  if "decomposition" in summary:
    d = summary["decomposition"]
    _log(
        f"[audit] decomposition ({d['sketch']} k={d['sketch_dim']} on {d['subspace']}, {d['subspace_size']} "
        f"parameters): own term mean {d['chosen_own_mean']:+.4f}, others' {d['chosen_others_mean']:+.4f}; first "
        f"order falls because of the others for {round(d['share_displaced_by_others'] * n)}/{n}, its own update for "
        f"{round(d['share_displaced_by_own'] * n)}/{n}; {d['decomposition_seconds']:.1f} s "
        f"against the replay's {d['replay_seconds']:.1f} s ({d['decomposition_cost_vs_one_epoch']:.2f} x one epoch's "
        f"replay, compiles included); own + others vs the exact first order on the subspace: correlation "
        f"{_fmt(d['own_plus_others_vs_subspace_first_order_corr'])}, relative error "
        f"{d['own_plus_others_vs_subspace_first_order_rel_error']:.3f}"
    )
  examples = {
      int(e.index): e
      for e in schema.load_preference_data(
          config.data.path, split=config.data.get("split") or None, schema=config.data.get("schema", "auto")
      )
  }
  k = min(int(config.get("audit", {}).get("top_k", TOP_K)), n)
  _log(f"[audit] the {k} pairs predicted to fall most (0-based row, index; at theta0 + D, first order):")
  for r in sorted(rows, key=lambda r: r["chosen_along_direction"])[:k]:
    e = examples.get(r["index"])
    text = f" prompt {excerpt(e.prompt)!r} y+ {excerpt(e.chosen, 40)!r}" if e is not None else ""
    pushed = ""
    if r.get("top_contributors"):
      pushed = " pushed down most by rows " + ", ".join(str(c["row"]) for c in r["top_contributors"][:3]) + ";"
    _log(
        f"[audit]   row {r['row']} (index {r['index']}): {r['chosen_along_direction']:+.4f}, "
        f"{r['chosen_first_order']:+.4f};{pushed}{text}"
    )
  outputs = [ROWS_FILE, SUMMARY_FILE]
  if filter_cfg is not None:
    record = write_filter(rows, examples, filter_cfg, config.output_dir)
    summary["filter"] = {k: record[k] for k in ("mode", "measure", "k", "fraction", "num_selected", "dropped")}
    rundir.write_json(os.path.join(config.output_dir, SUMMARY_FILE), summary)
    outputs += [score_outputs.FILTERED_FILE, score_outputs.FILTERED_INDICES_FILE]
    _log(
        f"[audit] filter {filter_cfg.mode} on {filter_cfg.measure}: kept {record['num_selected']}/{n}, dropped "
        f"indices {record['dropped'][:TOP_K]}{' ...' if len(record['dropped']) > TOP_K else ''}"
    )
  _log(f"[audit] outputs: {config.output_dir}/{{{','.join(outputs)}}}")
  return summary


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry: 0, 1 (bad input: one line on stderr) or 2 (bad flags)."""
  flag_values, status = cli.parse_config_flags(
      argv,
      "Displacement audit: per-pair prediction of a configured run, before training",
      prog="displacement_jax.audit",
  )
  if flag_values is None:
    return status
  return cli.one_line_errors(sharding.reporting_failures(lambda: run(flag_values.config)))


if __name__ == "__main__":
  sys.exit(main())
