#!/usr/bin/env python
"""Run every command of a config's sweep, one after another or N at a time.

    python launch/run_sweep.py configs/ches_quantiles.py:model=olmo1b --dry-run
    python launch/run_sweep.py configs/ches_quantiles.py:dataset=alpacafarm,tiny --parallel 2
    python launch/run_sweep.py configs/x.py -- --config.num_steps=5     # extra args for every run

The runs are the config file's `get_sweep()` (beside its `get_config(arg)`), expanded by `displacement_jax.config.sweep`.

Each run's stdout/stderr go to <output_dir>/launch.log. Exit status 1 when any run failed (all runs are
still attempted); the failed output directories are listed at the end.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from displacement_jax.config import sweep  # pylint: disable=g-import-not-at-top,wrong-import-position


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("config", help="configs/<name>.py[:arg]")
  parser.add_argument("--parallel", type=int, default=1, help="runs at the same time (default 1)")
  parser.add_argument("--dry-run", action="store_true", help="print the command lines, run nothing")
  parser.add_argument("--python", default=sys.executable, help="python interpreter for the runs")
  parser.add_argument("--module", default=sweep.TRAIN_MODULE, help="python -m entry point of every run")
  parser.add_argument("--only", default="", help="run only commands whose text contains this substring")
  parser.add_argument("extra", nargs="*", help="extra args appended to every run (after --)")
  args = parser.parse_args(argv)
  if args.parallel < 1:
    parser.error(f"--parallel must be >= 1, got {args.parallel}")
  return args


def output_dir_of(cmd):
  return cmd[-1].split("=", 1)[1]


def launch(cmd):
  out_dir = output_dir_of(cmd)
  os.makedirs(out_dir, exist_ok=True)
  log = open(os.path.join(out_dir, "launch.log"), "w")
  return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    commands = sweep.expand(args.config, python=args.python, extra_args=args.extra, module=args.module)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  commands = [c for c in commands if args.only in " ".join(c)]
  if args.dry_run:
    for cmd in commands:
      print(shlex.join(cmd))
    print(f"# {len(commands)} runs", file=sys.stderr)
    return 0
  pending, running, failed, done = list(commands), [], [], 0
  start = time.time()
  while pending or running:
    while pending and len(running) < args.parallel:
      cmd = pending.pop(0)
      print(f"[start] {shlex.join(cmd)}", flush=True)
      running.append((cmd, *launch(cmd)))
    time.sleep(0.2)
    for item in list(running):
      cmd, proc, log = item
      if proc.poll() is None:
        continue
      running.remove(item)
      log.close()
      done += 1
      status = "ok" if proc.returncode == 0 else f"FAILED rc={proc.returncode}"
      print(f"[{done}/{len(commands)} {status}] {output_dir_of(cmd)} ({time.time() - start:.0f}s)", flush=True)
      if proc.returncode:
        failed.append(output_dir_of(cmd))
  if failed:
    print(
        f"{len(failed)} of {len(commands)} runs failed (see launch.log in each): " + " ".join(failed), file=sys.stderr
    )
    return 1
  print(f"all {len(commands)} runs finished")
  return 0


if __name__ == "__main__":
  sys.exit(main())
