r"""Check the compile-time memory plan against a run: predicted total vs the measured peak RSS of the step.

For each case a fresh subprocess (one device, or 8 forced host devices) builds the case's function as
benchmarks/memory_plan.py does and compiles it (the plan: `memory_analysis()` total), and runs it once on fresh
arguments (which compiles the param and state initialisers and starts XLA's runtime). Then, with that memory
released (gc, malloc_trim), it reads its resident set size (baseline: after imports, jax start-up, the compiles
and one step, before any array of the measured step exists), creates the arguments (random params, optimizer
state, the batch) and releases what their initialisers freed, resets the kernel's peak-RSS mark
(`/proc/self/clear_refs` 5), runs the compiled step once and reads the peak (`VmHWM`). Measured = peak - baseline:
the arguments the step holds and every byte its buffers touched, which is what the plan's total counts
(arguments + outputs - aliased + temporaries) plus the arguments jit dropped as never read (`unused`: scoring's
untied LM head, which the process holds all the same), plus whatever else the process grew by meanwhile (allocator
slack, XLA's thread-pool scratch). The peak while the arguments are created is reported beside it (`init peak`): it is
not the step's (drawing random params materialises the random bits and float copies of the largest leaf, the
embedding, which a small plan's temporaries need not exceed), and an earlier version that opened the peak window
before creating the arguments measured it instead for SmolLM2 scoring at batch 4 (1.38). Linux only.

  python -m benchmarks.memory_check --shape=cpu --batch=4 --methods=full,lora
  python -m benchmarks.memory_check --shape=smollm2-135m --batch=4 --tasks=train --methods=full,lora --remat=1
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import gc
import json
import os
import subprocess
import sys
import time
from typing import Any

import jax

from benchmarks import memory_plan, tables

GIB = 2**30


def rss_kib(field: str) -> int:
  """VmRSS or VmHWM of this process, KiB (/proc/self/status)."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  raise RuntimeError(f"no {field} in /proc/self/status")


def release_freed_memory() -> None:
  """Return freed heap memory to the kernel (gc, then glibc's malloc_trim), so RSS shows what is in use."""
  gc.collect()
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass


def reset_peak_rss() -> None:
  """Set this process's VmHWM to its current RSS (Linux: write 5 to /proc/self/clear_refs)."""
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")


def measure(case: memory_plan.Case) -> dict[str, Any]:
  """Plan and measure `case` in this process (see the module docstring); bytes."""
  prepared = memory_plan.prepare(case)
  start = time.perf_counter()
  compiled = prepared.lower().compile()
  compile_s = time.perf_counter() - start
  plan = memory_plan.memory(compiled, prepared.args)
  compile_peak = rss_kib("VmHWM") * 1024
  warm = jax.block_until_ready(compiled(*prepared.make_args()))  # compiles the init functions, starts the runtime
  del warm
  release_freed_memory()
  baseline = rss_kib("VmRSS") * 1024
  reset_peak_rss()
  args = jax.block_until_ready(prepared.make_args())
  args_peak = rss_kib("VmHWM") * 1024  # the initialisers' temporaries too (random params: bits, then floats)
  release_freed_memory()
  with_args = rss_kib("VmRSS") * 1024
  reset_peak_rss()  # the step's window opens with its arguments in place
  start = time.perf_counter()
  out = jax.block_until_ready(compiled(*args))
  step_s = time.perf_counter() - start
  peak = rss_kib("VmHWM") * 1024
  del out, args
  return dict(
      dataclasses.asdict(case),
      **{f"plan_{k}": v for k, v in plan.items()},
      baseline_rss=baseline,
      compile_peak_rss=compile_peak,
      measured_arguments=with_args - baseline,
      measured_args_peak=args_peak - baseline,
      measured_peak=peak - baseline,
      compile_s=compile_s,
      step_s=step_s,
  )


def run_in_subprocess(case: memory_plan.Case, timeout: int) -> dict[str, Any]:
  """`measure(case)` in a fresh process (8 forced host devices for an 8-device mesh)."""
  env = dict(os.environ)
  if case.devices > 1:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={case.devices}").strip()
  env["JAX_PLATFORMS"] = "cpu"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
  cmd = [sys.executable, "-m", "benchmarks.memory_check", "--child", json.dumps(dataclasses.asdict(case))]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, timeout=timeout)
  lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
  if proc.returncode or not lines:
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    raise RuntimeError(f"{case.label()}: the measuring process exited {proc.returncode}: {' | '.join(tail)}")
  return json.loads(lines[-1])


def table(results: list[dict[str, Any]]) -> list[str]:
  lines = [
      "| case | plan: arguments | measured: arguments | plan: total (x devices) | plan: + unused arguments | "
      "measured: peak - baseline | measured / plan | init peak (not the step's) | step | compile |",
      "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in results:
    mib = lambda b: f"{b / 2**20:,.0f} MiB"
    label = memory_plan.Case(**memory_plan.result_fields(r)).label()
    n = memory_plan.MESHES[r["mesh"]]["data"] * memory_plan.MESHES[r["mesh"]]["fsdp"]  # devices in this process
    held = n * r["plan_total"] + r.get("plan_unused", 0)  # the run holds the arguments jit dropped too
    ratio = r["measured_peak"] / held
    cells = [
        label,
        mib(n * r["plan_arguments"]),
        mib(r["measured_arguments"]),
        mib(n * r["plan_total"]),
        mib(held),
        mib(r["measured_peak"]),
        f"**{ratio:.2f}**",
        mib(r["measured_args_peak"]),
        f"{r['step_s']:.1f} s",
        f"{r['compile_s']:.1f} s",
    ]
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  csv = lambda s: [x for x in s.split(",") if x]
  p.add_argument("--child", default="", help=argparse.SUPPRESS)
  p.add_argument("--shape", default="cpu", choices=tuple(memory_plan.shapes.SHAPES))
  p.add_argument("--tasks", type=csv, default=["train", "score"])
  p.add_argument("--methods", type=csv, default=["full"])
  p.add_argument("--dtype", default="float32")
  p.add_argument("--remat", type=int, default=0)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--mesh", default="1", choices=tuple(memory_plan.MESHES))
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--prompt", type=int, default=256)
  p.add_argument("--timeout", type=int, default=1800)
  p.add_argument("--json", default="")
  p.add_argument("--append", default="", help="append the markdown table to this file (BENCHMARKS.md)")
  a = p.parse_args(argv)
  if a.child:
    fields = json.loads(a.child)
    print(json.dumps(measure(memory_plan.Case(**fields))), flush=True)
    return []
  cases = memory_plan.grid(
      a.tasks, [a.shape], a.methods, [a.dtype], [bool(a.remat)], [a.batch], [a.mesh], seq=a.seq, prompt=a.prompt
  )
  results = []
  for i, case in enumerate(cases):
    print(f"[{i + 1}/{len(cases)}] {case.label()} ...", file=sys.stderr, flush=True)
    results.append(run_in_subprocess(case, a.timeout))
  command = "python -m benchmarks.memory_check " + " ".join(argv if argv is not None else sys.argv[1:])
  header = [
      "",
      f"### Memory plan vs measured peak RSS ({datetime.date.today().isoformat()}, CPU, jax {jax.__version__})",
      "",
      f"`{command.strip()}`; measured = the process's peak RSS while the step runs minus its RSS before the step's "
      "arguments existed; plan = total + the arguments jit dropped as unused (module docstring of "
      "benchmarks/memory_check.py); per device = per process here.",
      "",
  ]
  tables.emit(header + table(results), a.append)
  if a.json:
    with open(a.json, "w") as f:
      json.dump(results, f, indent=1)
  return results


if __name__ == "__main__":
  main()
