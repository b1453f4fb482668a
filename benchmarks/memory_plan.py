r"""Compile-time memory plan of the real DPO train step and CHES scoring pass: nothing is allocated.

Each case builds the run's own jitted functions (`fns_lib.make_fns`'s train step: sharded, state donated, the
configured NaN guard; `scoring.sharded_score_fn`) for parameters given as `jax.ShapeDtypeStruct`s, lowers and
compiles them for the batch the run would feed (`abstract args -> .lower(...).compile()`) and prints XLA's
`compiled.memory_analysis()` per device: arguments (params, optimizer state, batch), outputs, aliased
(donated) bytes, temporaries, and total = arguments + outputs - aliased + temporaries.

The batch: `--batch` pairs, each a `--prompt`-token prompt (default 256) with two responses filling `--seq`
(default 512) tokens per side (data.max_length), laid out as training lays them out (shared-prompt packing, two
pairs per row, rows planned per data-parallel device: data/packing.py), reference log-probs precomputed (in the
batch, as in training). Scoring: one packed row per pair, as `scoring.score_pairs` runs it.

Methods: `full` (every param trained, optimizer state per param) and `lora` (train/lora.py's own pieces:
`attach` with the case's base params as ShapeDtypeStructs gives abstract adapters of rank 8 at PEFT's
all-linear modules, alpha 16; `jit_train_step` is the run's LoRA step; the state (adapters and their optimizer
state, fp32) is donated, the base params in the case's dtype are an argument never updated).

  python -m benchmarks.memory_plan                          # the default grid (8 compiles)
  python -m benchmarks.memory_plan --full                   # every combination of issue 33 (hours on 2 cores)
  python -m benchmarks.memory_plan --shapes=llama3-8b --dtypes=bfloat16 --remat=1 --batches=8
  python -m benchmarks.memory_plan --fit --shapes=llama3-8b,olmo-1b --dtypes=bfloat16 --remat=1   # largest batch

8-device cases (`--meshes=fsdp8` or `data8`) compile in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8. The numbers are XLA:CPU's buffer assignment for the
program; XLA:GPU fuses and schedules differently, so a GPU's peak can differ (no GPU was available to compare).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import os
import subprocess
import sys
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import numpy as np

from benchmarks import gpu_mfu, shapes, tables
from configs import base
from displacement_jax import runtime, sharding
from displacement_jax.data import batching, layout, packing
from displacement_jax.models import lora, transformer
from displacement_jax.score import core as scoring
from displacement_jax.train import fns as fns_lib
from displacement_jax.train import lora as lora_train

GIB = 2**30
MESHES = {"1": dict(data=1, fsdp=1), "fsdp8": dict(data=1, fsdp=8), "data8": dict(data=8, fsdp=1)}
TASKS = ("train", "score")
METHODS = ("full", "lora")
LORA_RANK = 8  # the authors' lora_rank; alpha, dropout and target_modules: configs/base.py's (16, 0, all-linear)
DEFAULT_BUDGET_GB = 80.0


@dataclasses.dataclass(frozen=True)
class Case:
  """One compile: task, model shape, method (full fine-tuning or LoRA), param dtype, remat, batch and mesh."""

  task: str
  shape: str
  method: str
  dtype: str  # params, optimizer state and compute (LoRA: base params and compute; adapters fp32)
  remat: bool
  batch: int
  mesh: str
  seq: int = 512
  prompt: int = 256
  optim: str = "rmsprop"
  guard: str = "state"

  @property
  def devices(self) -> int:
    return MESHES[self.mesh]["data"] * MESHES[self.mesh]["fsdp"]

  def label(self) -> str:
    dtype = {"float32": "fp32", "bfloat16": "bf16"}.get(self.dtype, self.dtype)
    remat = ", remat" if self.remat else ""
    return f"{self.task} {self.shape} {self.method} {dtype}{remat} batch {self.batch} mesh {self.mesh}"


# ------------------------------------------------------------------------------------------------ the cases


def train_config(case: Case) -> Any:
  """configs/base.py with the case's dtype, remat, batch, optimizer, guard, mesh and LoRA rank (everything else
  default)."""

  config = base.get_base_config()
  config.model.dtype = config.model.param_dtype = case.dtype
  config.model.remat = bool(case.remat)
  config.batch_size = int(case.batch)
  config.data.max_length = int(case.seq)
  config.optim.name = case.optim
  config.optim.guard = case.guard
  config.mesh.update(MESHES[case.mesh])
  config.model.lora.rank = LORA_RANK if case.method == "lora" else 0
  return config


def make_mesh(case: Case) -> Any:

  if jax.device_count() != case.devices:
    raise ValueError(f"{case.label()}: needs {case.devices} devices, this process has {jax.device_count()}")
  return sharding.make_mesh(**MESHES[case.mesh])


def host_batch(case: Case, vocab_size: int, data_shards: int) -> dict[str, np.ndarray]:
  """The batch the case's step is fed (numpy, small): training's packed rows, or scoring's one row per pair."""

  if case.prompt < 1 or case.prompt >= case.seq:
    raise ValueError(f"--prompt={case.prompt} must be in 1..seq-1 (seq {case.seq})")
  config = train_config(case)
  if case.task == "score":
    rows = layout.round_up(case.batch, data_shards)
    collated = gpu_mfu.synthetic_batch(rows, case.seq, vocab_size, prompt=case.prompt)
    cap = 2 * case.seq
    packed = packing.pack_batch(collated, bucket=lambda n: layout.bucket_length(n, cap))
    out = {k: v for k, v in packed.items() if k in packing.PACKED_KEYS}
    out.update({key: collated[key] for key in scoring.DROP_EOS.values()})
    return out
  collated = gpu_mfu.synthetic_batch(case.batch, case.seq, vocab_size, prompt=case.prompt)
  return packing.pack_pairs(
      collated,
      pairs_per_row=runtime.pairs_per_row(config),
      bucket=batching.packed_bucket,
      groups=data_shards,
      micro_batches=int(config.optim.grad_accum),
  )


def abstract(tree: Any) -> Any:
  """ShapeDtypeStructs of a pytree of arrays."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def abstract_params(model_config: Any) -> Any:
  """The param tree of `model_config` as ShapeDtypeStructs (nothing allocated)."""

  return jax.eval_shape(lambda key: transformer.init_params(model_config, key), jax.random.key(0))


@dataclasses.dataclass
class Prepared:
  """A case's jitted function, its abstract arguments, and how to make real ones (for a measuring run)."""

  fn: Any
  args: tuple[Any, ...]
  make_args: Callable[[], tuple[Any, ...]]

  def lower(self) -> Any:
    return self.fn.lower(*self.args)


def prepare(case: Case) -> Prepared:
  """The run's own jitted function of `case` (train step or scoring pass) for abstract arguments."""
  mesh = make_mesh(case)
  config = train_config(case)
  model_config = shapes.model_config(case.shape, dtype=case.dtype, remat=case.remat)
  model = transformer.Transformer(model_config)
  params = abstract_params(model_config)
  host = host_batch(case, model_config.vocab_size, sharding.data_parallel_size(mesh))
  batch = abstract(host)
  param_sh = sharding.param_shardings(params, mesh)
  init_params = jax.jit(lambda key: transformer.init_params(model_config, key), out_shardings=param_sh)
  put_batch = lambda: sharding.global_batch_to_devices(host, mesh)
  if case.task == "score":
    fn = scoring.sharded_score_fn(model, param_sh, mesh)
    return Prepared(fn, (params, batch), lambda: (init_params(jax.random.key(0)), put_batch()))
  if case.method not in METHODS:
    raise ValueError(f"{case.label()}: unknown method {case.method!r} (known: {', '.join(METHODS)})")
  loaded = runtime.Loaded(model=model, params=params, model_config=model_config, tokenizer=None, identity={})
  if case.method == "lora":
    ad = lora_train.attach(loaded, config)  # abstract base: abstract adapters
    step, init_state = lora_train.jit_train_step(loaded.model, config, mesh, 1, param_sh, ad.initial)

    def make_args() -> tuple[Any, ...]:
      base_params = init_params(jax.random.key(0))
      adapters = lora.init_adapters(base_params, ad.rank, ad.targets, jax.random.key(int(config.seed)))
      return init_state(adapters), put_batch(), base_params

    return Prepared(step, (jax.eval_shape(init_state, ad.initial), batch, params), make_args)
  fns = fns_lib.make_fns(loaded, config, mesh, total_steps=1)
  state = jax.eval_shape(fns.init_state, params)
  return Prepared(fns.train_step, (state, batch), lambda: (fns.init_state(init_params(jax.random.key(0))), put_batch()))


def memory(compiled: Any, args: Any = None) -> dict[str, int]:
  """Per-device bytes of a compiled function: arguments, outputs, aliased (donated), temporaries, total; with the
  abstract `args` of a one-device program also `unused`: the bytes of the arguments jit dropped because the program
  never reads them (scoring: an untied LM head), which a run holds all the same."""
  m = compiled.memory_analysis()
  out = dict(
      arguments=int(m.argument_size_in_bytes),
      outputs=int(m.output_size_in_bytes),
      aliased=int(m.alias_size_in_bytes),
      temporaries=int(m.temp_size_in_bytes),
  )
  out["total"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
  if args is not None and jax.device_count() == 1:
    held = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(args))
    out["unused"] = max(0, held - out["arguments"])
  return out


def plan_one(case: Case) -> dict[str, Any]:
  """Compile `case` and return its memory (bytes per device), compile seconds and the case's fields."""
  start = time.perf_counter()
  prepared = prepare(case)
  compiled = prepared.lower().compile()
  result = dict(dataclasses.asdict(case), **memory(compiled, prepared.args if case.devices == 1 else None))
  result["compile_s"] = time.perf_counter() - start
  return result


# ------------------------------------------------------------------------------------- running a grid


def run_cases(cases: Sequence[Case], on_result: Callable[[dict[str, Any]], None]) -> None:
  """Compile every case (one at a time): those of this process's device count here, the others in a child
  process per device count (`--child`, 8 host devices forced by XLA_FLAGS). A case that fails to compile gives
  a result with its `error` instead of memory."""
  here = [c for c in cases if c.devices == jax.device_count()]
  for case in here:
    on_result(_safe_plan(case))
  for n, group in itertools.groupby(
      sorted((c for c in cases if c not in here), key=lambda c: c.devices), key=lambda c: c.devices
  ):
    _run_child(n, list(group), on_result)


def _safe_plan(case: Case) -> dict[str, Any]:
  try:
    return plan_one(case)
  except Exception as e:  # pylint: disable=broad-except  (reported in the table, the grid goes on)
    lines = [line for line in str(e).splitlines() if line.strip()]
    return dict(dataclasses.asdict(case), error=f"{type(e).__name__}: {lines[0] if lines else ''}")


def _run_child(devices: int, cases: list[Case], on_result: Callable[[dict[str, Any]], None]) -> None:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}").strip()
  env["JAX_PLATFORMS"] = "cpu"
  payload = json.dumps([dataclasses.asdict(c) for c in cases])
  cmd = [sys.executable, "-m", "benchmarks.memory_plan", "--child"]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
  with subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True, cwd=root) as proc:
    proc.stdin.write(payload)
    proc.stdin.close()
    seen = 0
    for line in proc.stdout:
      if line.startswith("{"):
        on_result(json.loads(line))
        seen += 1
    proc.wait()
  if proc.returncode or seen != len(cases):
    raise RuntimeError(f"the {devices}-device child process exited {proc.returncode} after {seen}/{len(cases)} cases")


def child_main() -> None:
  """`--child`: the cases (JSON list on stdin) compiled here, one JSON line each on stdout."""
  for fields in json.loads(sys.stdin.read()):
    print(json.dumps(_safe_plan(Case(**fields))), flush=True)


class Progress:
  """`[k/n] case: total X GiB (compile s; ETA m:ss)` lines, the ETA from the mean compile time so far."""

  def __init__(self, n: int):
    self.n, self.k, self.start = n, 0, time.perf_counter()
    self.results: list[dict[str, Any]] = []

  def __call__(self, result: dict[str, Any]) -> None:
    self.k += 1
    self.n = max(self.n, self.k)  # --fit's count is a guess: its search may take more compiles
    self.results.append(result)
    elapsed = time.perf_counter() - self.start
    eta = elapsed / self.k * (self.n - self.k)
    what = result.get("error") or f"total {result['total'] / GIB:.2f} GiB"
    label = Case(**{**result_fields(result)}).label()
    seconds = f"{result['compile_s']:.1f} s" if "compile_s" in result else "failed"
    print(f"[{self.k}/{self.n}] {label}: {what} ({seconds}; ETA {_clock(eta)})", file=sys.stderr, flush=True)


def result_fields(result: dict[str, Any]) -> dict[str, Any]:
  return {f.name: result[f.name] for f in dataclasses.fields(Case)}


def _clock(seconds: float) -> str:
  m, s = divmod(int(round(seconds)), 60)
  return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def grid(
    tasks: Iterable[str],
    shapes_: Iterable[str],
    methods: Iterable[str],
    dtypes: Iterable[str],
    remats: Iterable[bool],
    batches: Iterable[int],
    meshes: Iterable[str],
    **fixed: Any,
) -> list[Case]:
  """Every combination (scoring has no method, remat or optimizer: one full-params case per shape, dtype, batch
  and mesh); batches that do not split over the mesh's devices are left out."""
  out: list[Case] = []
  for task, shape, method, dtype, remat, batch, mesh in itertools.product(
      tasks, shapes_, methods, dtypes, remats, batches, meshes
  ):
    case = Case(task, shape, method, dtype, bool(remat), int(batch), mesh, **fixed)
    if batch % case.devices:
      continue
    if task == "score":
      case = dataclasses.replace(case, method="full", remat=False)
    if case not in out:
      out.append(case)
  return out


def largest_fitting(
    base_case: Case, budget: int, max_batch: int, on_result: Callable[[dict[str, Any]], None]
) -> tuple[int, dict[str, Any] | None, dict[str, Any] | None]:
  """(largest batch whose plan fits `budget` bytes per device, its result, the result of the next batch up).

  Batches are multiples of the mesh's device count. The plan grows with the batch, nearly linearly, so the
  search interpolates: batch s and 4s (s = devices) give a first guess, then the bracket [largest fitting,
  smallest failing] shrinks by interpolation and bisection in turn until it is one step wide. Every number
  returned is a compile's.
  """
  step = base_case.devices
  found: dict[int, dict[str, Any]] = {}

  def total(batch: int) -> float:
    if batch not in found:
      results: list[dict[str, Any]] = []
      run_cases([dataclasses.replace(base_case, batch=batch)], lambda r: (results.append(r), on_result(r)))
      found[batch] = results[0]
    r = found[batch]
    return float("inf") if "error" in r else float(r["total"])

  top = max_batch // step * step
  if total(step) > budget:
    return 0, None, found[step]
  lo, hi = step, None
  probe = min(4 * step, top)
  turn = 0
  while True:
    if probe > lo:
      if total(probe) <= budget:
        lo = probe
      else:
        hi = probe
    if lo >= top or (hi is not None and hi - lo <= step):
      break
    far = hi if hi is not None else min(found)  # no failing batch yet: extrapolate from the smallest
    if turn % 2 == 0 or hi is None:  # interpolate (or extrapolate) the total linearly
      slope = (total(far) - total(lo)) / (far - lo) if far != lo and total(far) != total(lo) else 0.0
      guess = int(lo + (budget - total(lo)) / slope) if slope > 0 else 2 * lo
    else:
      guess = (lo + hi) // 2
    turn += 1
    guess = guess // step * step
    upper = (hi - step) if hi is not None else top
    probe = max(lo + step, min(guess, upper))
  return lo, found[lo], found.get(lo + step)


# ------------------------------------------------------------------------------------------------- output


def table(results: Sequence[dict[str, Any]]) -> list[str]:
  """Markdown rows: the case and its per-device GiB."""
  lines = [
      "| task | shape | method | params | remat | batch | mesh | arguments | outputs | aliased | temporaries | "
      "**total / device** | compile |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in results:
    dtype = {"float32": "fp32", "bfloat16": "bf16"}.get(r["dtype"], r["dtype"])
    head = [r["task"], r["shape"], r["method"], dtype, "on" if r["remat"] else "off", r["batch"], r["mesh"]]
    if "error" in r:
      cells = head + ["", "", "", "", f"failed: {r['error'][:80]}", ""]
    else:
      g = lambda k: f"{r[k] / GIB:.2f}"
      cells = head + [g("arguments"), g("outputs"), g("aliased"), g("temporaries"), f"**{g('total')}**"]
      cells.append(f"{r['compile_s']:.0f} s")
    lines.append("| " + " | ".join(str(c) for c in cells) + " |")
  return lines


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  csv = lambda s: [x for x in s.split(",") if x]
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--full", action="store_true", help="issue 33's whole grid (both tasks, all shapes, ... batch 1..32)")
  p.add_argument("--tasks", type=csv, default=["train", "score"])
  p.add_argument("--shapes", type=csv, default=["llama3-8b", "olmo-1b"])
  p.add_argument("--methods", type=csv, default=["full"], help=f"full, lora (rank {LORA_RANK}, all-linear)")
  p.add_argument("--dtypes", type=csv, default=["bfloat16", "float32"])
  p.add_argument("--remat", type=csv, default=["1"], help="comma list of 0/1")
  p.add_argument("--batches", type=csv, default=["8"], help="pairs per step (comma list)")
  p.add_argument("--meshes", type=csv, default=["1"], help=f"comma list of {', '.join(MESHES)}")
  p.add_argument("--seq", type=int, default=512, help="tokens per side (prompt + response), data.max_length")
  p.add_argument("--prompt", type=int, default=256, help="prompt tokens of each synthetic pair")
  p.add_argument("--optim", default="rmsprop", choices=("rmsprop", "adamw", "sgd"))
  p.add_argument("--guard", default="state", choices=("state", "gradients"))
  p.add_argument("--fit", action="store_true", help="largest train batch within --budget_gb per combination")
  p.add_argument("--budget_gb", type=float, default=DEFAULT_BUDGET_GB, help="per device, 10^9 bytes")
  p.add_argument("--max_batch", type=int, default=256)
  p.add_argument("--json", default="", help="write every result to this file")
  p.add_argument("--append", default="", help="append the markdown table to this file (BENCHMARKS.md)")
  a = p.parse_args(argv)
  if a.child:
    child_main()
    return []
  for name, values, known in (
      ("--tasks", a.tasks, TASKS),
      ("--shapes", a.shapes, shapes.SHAPES),
      ("--methods", a.methods, METHODS),
      ("--meshes", a.meshes, MESHES),
  ):
    unknown = [v for v in values if v not in known]
    if unknown:
      p.error(f"{name}: unknown {', '.join(unknown)}; known: {', '.join(known)}")
  if a.full:
    a.tasks, a.shapes, a.methods = list(TASKS), ["llama3-8b", "olmo-1b", "smollm2-135m"], list(METHODS)
    a.dtypes, a.remat, a.batches, a.meshes = (
        ["float32", "bfloat16"],
        ["0", "1"],
        list("1 2 4 8 16 32".split()),
        [
            "1",
            "fsdp8",
        ],
    )
  fixed = dict(seq=a.seq, prompt=a.prompt, optim=a.optim, guard=a.guard)
  remats = [bool(int(r)) for r in a.remat]
  budget = int(a.budget_gb * 1e9)
  if a.fit:
    combos = grid(["train"], a.shapes, a.methods, a.dtypes, remats, [8], a.meshes, **fixed)
    progress = Progress(len(combos) * 4)
    fits = []
    for combo in combos:
      batch, ok, over = largest_fitting(combo, budget, a.max_batch, progress)
      fits.append((combo, batch, ok, over))
    lines = fit_table(fits, a.budget_gb, a.max_batch)
    results = progress.results
  else:
    cases = grid(a.tasks, a.shapes, a.methods, a.dtypes, remats, [int(b) for b in a.batches], a.meshes, **fixed)
    progress = Progress(len(cases))
    run_cases(cases, progress)
    results = progress.results
    lines = table(results)
  command = "python -m benchmarks.memory_plan " + " ".join(argv if argv is not None else sys.argv[1:])
  header = [
      "",
      f"### Compile-time memory plan ({datetime.date.today().isoformat()}, XLA:CPU, jax {jax.__version__})",
      "",
      f"`{command.strip()}`; seq {a.seq} ({a.prompt}-token prompts), optimizer {a.optim}, guard {a.guard}; "
      "GiB per device."
      + (
          f" LoRA: rank {LORA_RANK}, alpha 16, all-linear; adapters and their optimizer state fp32."
          if "lora" in a.methods
          else ""
      ),
      "",
  ]
  tables.emit(header + lines, a.append)
  if a.json:
    with open(a.json, "w") as f:
      json.dump(results, f, indent=1)
  return results


def fit_table(
    fits: Sequence[tuple[Case, int, dict[str, Any] | None, dict[str, Any] | None]], budget_gb: float, max_batch: int
) -> list[str]:
  """Markdown rows of `--fit`: the largest batch within the budget and the plans either side of it."""
  lines = [
      f"| shape | method | params | remat | mesh | largest batch within {budget_gb:g} GB | its total / device | "
      "next batch tried | its total |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for case, batch, ok, over in fits:
    dtype = {"float32": "fp32", "bfloat16": "bf16"}.get(case.dtype, case.dtype)
    total = lambda r: "" if r is None else (r.get("error", "")[:60] or f"{r['total'] / GIB:.2f} GiB")
    shown = f"**{batch}**" if batch else "**none** (not even the smallest)"
    if batch and batch >= max_batch:
      shown = f"**>= {batch}** (--max_batch)"
    lines.append(
        "| "
        + " | ".join(
            str(c)
            for c in [
                case.shape,
                case.method,
                dtype,
                "on" if case.remat else "off",
                case.mesh,
                shown,
                total(ok),
                "" if over is None else over["batch"],
                total(over),
            ]
        )
        + " |"
    )
  return lines


if __name__ == "__main__":
  main()
