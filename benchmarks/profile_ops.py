r"""Where the time of a DPO step or a CHES scoring call goes, by op category, from a JAX profiler trace.

    python -m benchmarks.profile_ops --task=dpo --shape=cpu --pairs=8 --packing=1
    python -m benchmarks.profile_ops --task=score --shape=olmo-1b --pairs=32 --dtype=bfloat16   # on a GPU

Runs the workload (random weights, random-length pairs as in `cpu_vs_torch`), traces `--steps` calls with
`jax.profiler`, and matches the trace's op events to the compiled HLO's instructions; each instruction's
`op_name` metadata gives its category: dense layers (q/k/v/o and MLP projections), attention (scores, softmax,
weighted values), LM head + log-softmax (the chunked pass), other model ops (norms, RoPE, activations,
residuals, embedding), optimizer / rest. Prints a table (ms per call and share of the busy time) and the
top ops; `--append=BENCHMARKS.md` appends it.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import glob
import gzip
import json
import re
import sys
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from benchmarks import shapes, tables

CATEGORIES = ("dense layers", "attention", "LM head + log-softmax", "other model ops", "optimizer / rest")


def categorize(op_name: str) -> str:
  """Category of an HLO instruction from its `op_name` metadata (jax name stack)."""
  if "_proj" in op_name:
    return "dense layers"
  if "self_attn" in op_name:
    return "attention"
  if "Transformer" in op_name:
    return "other model ops"
  if "while" in op_name or "bcd,dv" in op_name or "logprob" in op_name:
    return "LM head + log-softmax"
  return "optimizer / rest"


def hlo_op_names(hlo_text: str) -> dict[str, str]:
  """{instruction name: op_name metadata} of a compiled module's text."""
  pattern = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = [^\n]*?op_name="([^"]+)"', re.M)
  return {m.group(1): m.group(2) for m in pattern.finditer(hlo_text)}


def op_times(trace_dir: str, names: dict[str, str]) -> collections.Counter:
  """Total microseconds per HLO instruction in the trace (events whose name is an instruction of `names`)."""
  files = sorted(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True))
  if not files:
    raise FileNotFoundError(f"no *.trace.json.gz written under {trace_dir} by jax.profiler")
  with gzip.open(files[-1]) as f:
    events = json.load(f)["traceEvents"]
  totals: collections.Counter = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("name") in names:
      totals[e["name"]] += float(e.get("dur", 0.0))
  return totals


def make_workload(
    task: str, shape: str, pairs: int, packing: bool, dtype: str, remat: bool, seed: int = 0
) -> tuple[Callable[[], Any], str]:
  """(run one call and block, compiled HLO text) of a DPO step or a scoring call on random-length pairs."""
  from benchmarks import cpu_vs_torch, gpu_mfu  # pylint: disable=g-import-not-at-top
  from displacement_jax import forward  # pylint: disable=g-import-not-at-top
  from displacement_jax.train import optim  # pylint: disable=g-import-not-at-top
  from displacement_jax.score import core as scoring  # pylint: disable=g-import-not-at-top
  from displacement_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  from displacement_jax.data import packing as packing_lib  # pylint: disable=g-import-not-at-top
  from displacement_jax.models.transformer import Transformer  # pylint: disable=g-import-not-at-top

  config = shapes.model_config(shape, dtype=dtype, remat=remat)
  model, params = Transformer(config), gpu_mfu.init_params_on_device(config, seed)
  rows = cpu_vs_torch.random_rows(pairs, config.vocab_size, prompt_len=(16, 96), response_len=(8, 192), seed=seed)
  if task == "score":  # scoring's layout: one pair per packed row (rows are sorted by length there)
    batch = packing_lib.pack_batch(cpu_vs_torch.pair_batch(rows)) if packing else cpu_vs_torch.pair_batch(rows)
  else:  # training's: up to 2 pairs per packed row (data.pairs_per_row)
    batch = cpu_vs_torch.train_layout(rows, pairs_per_row=2 if packing else 0)
  if task == "score":
    keys = packing_lib.PACKED_KEYS if packing else tuple(k for k in batch if k.endswith("_BT"))
    data = jax.device_put(
        {**{k: batch[k] for k in keys}, **{k: np.ones(len(rows), bool) for k in scoring.DROP_EOS.values()}}
    )
    fn = jax.jit(lambda p, b: scoring.score_batch(model, p, b))
    return (lambda: jax.block_until_ready(fn(params, data))), fn.lower(params, data).compile().as_text()
  ref = forward.pair_logps(model, params, jax.device_put(batch), chunk_size=128)
  data = jax.device_put(
      dict(batch, chosen_ref_logps_B=ref["chosen_logps_B"], rejected_ref_logps_B=ref["rejected_logps_B"])
  )
  loss_cfg = ml_collections.ConfigDict(dict(objective="dpo", beta=0.1, sft_coeff=0.0, label_smoothing=0.0))
  optimizer = optim.make_optimizer(ml_collections.ConfigDict(dict(name="rmsprop", lr=1e-6)), 10)
  step = jax.jit(step_lib.make_train_step(step_lib.make_loss_fn(model, loss_cfg, 128), optimizer, 1), donate_argnums=0)
  box = {
      "state": step_lib.TrainState(
          params=params,
          opt_state=optimizer.init(params),
          step=jnp.zeros((), jnp.int32),
          rng=jax.random.key_data(jax.random.key(seed)),
      )
  }
  hlo = step.lower(box["state"], data).compile().as_text()

  def one():
    box["state"], metrics = step(box["state"], data)
    jax.block_until_ready(metrics["loss"])

  return one, hlo


def profile(task: str, shape: str, pairs: int, packing: bool, steps: int, dtype: str, remat: bool) -> dict[str, Any]:
  """{'seconds': wall seconds per call, 'categories': {category: us per call}, 'ops': Counter (us per call)}."""
  one, hlo = make_workload(task, shape, pairs, packing, dtype, remat)
  one()  # compile + warm up
  names = hlo_op_names(hlo)
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp)
    t0 = time.perf_counter()
    for _ in range(steps):
      one()
    seconds = (time.perf_counter() - t0) / steps
    jax.profiler.stop_trace()
    totals = op_times(tmp, names)
  ops: collections.Counter = collections.Counter()
  categories = {c: 0.0 for c in CATEGORIES}
  for name, us in totals.items():
    label = re.sub(r"layers_\d+", "layers_*", names[name])
    ops[label] += us / steps
    categories[categorize(names[name])] += us / steps
  return dict(seconds=seconds, categories=categories, ops=ops)


def table(result: dict[str, Any], top: int) -> list[str]:
  """Markdown lines: categories (ms per call, share of the traced op time), then the top ops."""
  busy = sum(result["categories"].values()) or 1.0
  lines = ["| category | ms per call | share |", "|---|---|---|"]
  for c in CATEGORIES:
    us = result["categories"][c]
    lines.append(f"| {c} | {us / 1e3:.1f} | {100 * us / busy:.1f}% |")
  lines += ["", "| top op (layers merged) | ms per call | share |", "|---|---|---|"]
  for name, us in result["ops"].most_common(top):
    short = re.sub(r"^jit\([^)]*\)/", "", name)
    lines.append(f"| `{short[:110]}` | {us / 1e3:.1f} | {100 * us / busy:.1f}% |")
  return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--task", choices=("dpo", "score"), default="dpo")
  p.add_argument("--shape", choices=tuple(shapes.SHAPES), default="cpu")
  p.add_argument("--pairs", type=int, default=8, help="pairs per batch")
  p.add_argument("--packing", type=int, default=1, help="1: shared-prompt packed rows; 0: two-side batches")
  p.add_argument("--steps", type=int, default=3, help="calls traced")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--remat", type=int, default=0)
  p.add_argument("--top", type=int, default=12)
  p.add_argument("--append", default=None, help="append the tables to this markdown file")
  a = p.parse_args(argv)
  result = profile(a.task, a.shape, a.pairs, bool(a.packing), a.steps, a.dtype, bool(a.remat))
  device = jax.devices()[0]
  cmd = "python -m benchmarks.profile_ops " + " ".join(argv if argv is not None else sys.argv[1:])
  lines = [
      f'### Profile: {a.task}, shape `{a.shape}`, {a.pairs} pairs, {"packed" if a.packing else "two-side"} '
      f"({datetime.date.today().isoformat()})",
      "",
      f"Command: `{cmd.strip()}`  ",
      f'Device: {getattr(device, "device_kind", str(device))}; jax {jax.__version__}; {a.dtype}; '
      f'{result["seconds"] * 1e3:.0f} ms per call (wall, while tracing).',
      "",
      *table(result, a.top),
      "",
  ]
  text = tables.emit(lines, a.append)
  return dict(result, table=text)


if __name__ == "__main__":
  main()
