#!/usr/bin/env python
"""Rehearse a pod run on this machine: N processes of one command, each with the environment a pod worker gets.

    python launch/local.py -n 2 -d 2 -- python -m displacement_jax.train --config=configs/dpo_tiny.py \
        --config.output_dir=runs/dpo_tiny_2proc
    python launch/local.py -n 2 --dry-run -- python -m displacement_jax.score --config=configs/score_tiny.py

Process i gets JAX_COORDINATOR_ADDRESS=127.0.0.1:<port> (process 0 serves it, bound to the loopback address only:
JAX_COORDINATOR_BIND_ADDRESS), JAX_NUM_PROCESSES=N and JAX_PROCESS_ID=i -- what `sharding.mesh_from_config` reads
on any cluster -- plus JAX_PLATFORMS=cpu and XLA_FLAGS=--xla_force_host_platform_device_count=D (D simulated
devices per process, N x D in all; the collectives run over gloo). The port is a free one of 127.0.0.1 unless
--port is given.

Process 0's output goes to the terminal and to <log-dir>/process_0.log, process i's to <log-dir>/process_<i>.log
(default log dir: <--config.output_dir of the command>/launch_logs, else runs/local_logs). A failing process ends
the others by itself (sharding.PeerWatch: within a second after a Python error, after
config.distributed.peer_timeout when a process is killed); whatever still runs --grace seconds after the first
failure, or at --timeout, is terminated. Exit status: 0 when every process succeeded, else the status of the
first process that failed (128 + signal when killed, 124 at --timeout). --dry-run prints each process's
environment and command line (prefixed '+ ') and runs nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

DEVICE_FLAG = "--xla_force_host_platform_device_count"


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("-n", "--num-processes", type=int, default=2, help="processes to start (default 2)")
  parser.add_argument("-d", "--devices-per-process", type=int, default=2, help="simulated CPU devices each (default 2)")
  parser.add_argument("--port", type=int, default=0, help="coordinator port on 127.0.0.1 (default: a free one)")
  parser.add_argument("--log-dir", default="", help="where process_<i>.log go (default: see above)")
  parser.add_argument("--timeout", type=float, default=0, help="terminate every process after this many s (0: none)")
  parser.add_argument("--grace", type=float, default=90, help="s the others get to stop after a failure (default 90)")
  parser.add_argument("--dry-run", action="store_true", help="print the environments and commands, run nothing")
  parser.add_argument("command", nargs="+", help="the command every process runs (after --)")
  args = parser.parse_args(argv)
  if args.num_processes < 1 or args.devices_per_process < 1:
    parser.error("--num-processes and --devices-per-process must be >= 1")
  if not 0 <= args.port < 65536:
    parser.error(f"--port must be a TCP port, got {args.port}")
  return args


def free_port() -> int:
  """A currently free TCP port of 127.0.0.1."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return int(s.getsockname()[1])


def default_log_dir(command) -> str:
  for arg in command:
    if arg.startswith("--config.output_dir="):
      return os.path.join(arg.split("=", 1)[1], "launch_logs")
  return os.path.join("runs", "local_logs")


def worker_env(base, *, port: int, num_processes: int, process_id: int, devices: int) -> dict[str, str]:
  """The variables process `process_id` gets on top of `base` (what a pod worker's launcher sets)."""
  flags = [f for f in base.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_FLAG)]
  return {
      "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
      "JAX_COORDINATOR_BIND_ADDRESS": f"127.0.0.1:{port}",
      "JAX_NUM_PROCESSES": str(num_processes),
      "JAX_PROCESS_ID": str(process_id),
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": " ".join(flags + [f"{DEVICE_FLAG}={devices}"]),
  }


def _copy(stream, log, echo) -> None:
  """Process 0's output: to its log, and but for gloo's connection chatter to the terminal."""
  for line in iter(stream.readline, b""):
    log.write(line)
    log.flush()
    if not line.startswith(b"[Gloo] Rank"):
      echo.write(line)
      echo.flush()


def last_error_line(path: str) -> str:
  """The last `error: ...` line of a log, else its last fatal (`F<date> ...] msg`) line, else its last line that
  is not a stack frame or gloo chatter."""
  try:
    with open(path, errors="replace") as f:
      lines = [l.strip() for l in f if l.strip()]
  except OSError:
    return ""
  errors = [l for l in lines if l.startswith("error:")]
  fatal = [l.split("] ", 1)[-1] for l in lines if re.match(r"F\d{4} ", l)]
  plain = [l for l in lines if not l.startswith(("@ ", "*** ", "[Gloo]"))]
  return (errors or fatal or plain or [""])[-1][:500]


def describe(rc: int) -> str:
  if rc < 0:
    try:
      return f"killed by {signal.Signals(-rc).name}"
    except ValueError:
      return f"killed by signal {-rc}"
  return f"exited with status {rc}"


def stop_all(procs) -> None:
  """SIGTERM what still runs, then SIGKILL after 5 s."""
  for p in procs:
    if p.poll() is None:
      p.terminate()
  deadline = time.monotonic() + 5
  for p in procs:
    while p.poll() is None and time.monotonic() < deadline:
      time.sleep(0.05)
    if p.poll() is None:
      p.kill()
      p.wait()


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  port = args.port or free_port()
  log_dir = args.log_dir or default_log_dir(args.command)
  n = args.num_processes
  envs = [
      worker_env(os.environ, port=port, num_processes=n, process_id=i, devices=args.devices_per_process)
      for i in range(n)
  ]
  logs = [os.path.join(log_dir, f"process_{i}.log") for i in range(n)]
  if args.dry_run:
    for i in range(n):
      env = " ".join(f"{k}={shlex.quote(v)}" for k, v in envs[i].items())
      print(f"+ {env} {shlex.join(args.command)} > {shlex.quote(logs[i])} 2>&1 &")
    print(f"# {n} processes x {args.devices_per_process} devices, coordinator 127.0.0.1:{port}", file=sys.stderr)
    return 0

  os.makedirs(log_dir, exist_ok=True)
  procs, files, copiers = [], [], []
  for i in range(n):
    log = open(logs[i], "wb")
    files.append(log)
    out = subprocess.PIPE if i == 0 else log
    procs.append(subprocess.Popen(args.command, env=dict(os.environ, **envs[i]), stdout=out, stderr=subprocess.STDOUT))
    if i == 0:
      copier = threading.Thread(target=_copy, args=(procs[0].stdout, log, sys.stdout.buffer), daemon=True)
      copier.start()
      copiers.append(copier)
    print(f"[local] process {i}: pid {procs[i].pid}, log {logs[i]}", file=sys.stderr, flush=True)
  print(f"[local] {n} processes x {args.devices_per_process} devices, coordinator 127.0.0.1:{port}", file=sys.stderr)

  start, first_failure, status, timed_out = time.monotonic(), None, 0, False
  reported: set[int] = set()
  try:
    while True:
      now = time.monotonic()
      for i, p in enumerate(procs):
        rc = p.poll()
        if rc is not None and i not in reported:
          reported.add(i)
          if rc != 0:
            print(f"[local] process {i} {describe(rc)} after {now - start:.1f} s", file=sys.stderr, flush=True)
            if first_failure is None:
              first_failure, status = now, (128 - rc if rc < 0 else rc)
      if len(reported) == n:
        break
      if first_failure is not None and now - first_failure > args.grace:
        print(f"[local] terminating the processes still running {args.grace:g} s after the failure", file=sys.stderr)
        break
      if args.timeout and now - start > args.timeout:
        print(f"[local] --timeout={args.timeout:g} s reached: terminating every process", file=sys.stderr)
        timed_out = True
        break
      time.sleep(0.1)
  except KeyboardInterrupt:
    print("[local] interrupted: terminating every process", file=sys.stderr)
    status = 130
  finally:
    stop_all(procs)
    for copier in copiers:
      copier.join(timeout=5)
    for f in files:
      f.close()

  failed = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode != 0]
  for i, rc in failed:
    print(f"[local] process {i} {describe(rc)}: {last_error_line(logs[i])} ({logs[i]})", file=sys.stderr)
  if timed_out:
    return 124
  if not failed:
    print(f"[local] all {n} processes finished in {time.monotonic() - start:.1f} s", file=sys.stderr)
    return 0
  return status or (128 - failed[0][1] if failed[0][1] < 0 else failed[0][1])


if __name__ == "__main__":
  sys.exit(main())
