"""One run per output directory: `hold(output_dir, what)` locks output_dir/run.lock for the length of a run.

The lock is an exclusive `flock` on the file, so the kernel releases it when its process dies, kill -9 included;
the file's content (pid, host, start time, command) names the holder. A second run into the same directory
raises `RunLockedError` (a `UsageError`: exit status 2) at once, before loading anything. A lock file whose
`flock` is free but which still names a process is the leftover of a run that died: it is taken over with a
warning naming that run. A clean exit removes the file. Within one process the lock is re-entrant (a pipeline
may hold its directory while a stage it runs holds the same one).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
from typing import Any, Callable, Iterator

from displacement_jax.errors import UsageError

LOCK_FILE = "run.lock"
_held: dict[str, list[Any]] = {}  # realpath of a lock file -> [open file, hold count] of this process


class RunLockedError(UsageError):
  """Another live run holds the output directory."""


def describe(info: dict[str, Any]) -> str:
  """'pid 123 on host h, started 2026-12-01T10:00:00 (train)' from a lock file's content."""
  what = f" ({info['what']})" if info.get("what") else ""
  return f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started {info.get('started', '?')}{what}"


def _read(f: Any) -> dict[str, Any]:
  f.seek(0)
  text = f.read().strip()
  if not text:
    return {}
  try:
    info = json.loads(text)
  except json.JSONDecodeError:
    return {"pid": "?", "host": "?", "started": f"? (unreadable lock content {text[:60]!r})"}
  return info if isinstance(info, dict) else {}


def acquire(output_dir: str, what: str, *, log: Callable[[str], None] = print) -> str:
  """Lock `output_dir` for this process (see the module docstring); returns the lock file's path."""
  os.makedirs(output_dir, exist_ok=True)
  path = os.path.join(os.path.abspath(output_dir), LOCK_FILE)
  key = os.path.realpath(path)
  if key in _held:
    _held[key][1] += 1
    return path
  while True:
    f = open(path, "a+", encoding="utf-8")  # pylint: disable=consider-using-with  (held for the run)
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      info = _read(f)
      f.close()
      raise RunLockedError(
          f"output_dir {output_dir} is in use by another run ({describe(info)}; lock file {path}); wait for it to "
          "finish or use another output_dir"
      ) from None
    try:
      same_file = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
    except FileNotFoundError:
      same_file = False
    if same_file:
      break
    f.close()  # the holder removed the file between our open and our lock: lock the new one
  stale = _read(f)
  if stale:
    log(f"WARNING taking over the stale lock {path} of a run that is gone ({describe(stale)})")
  info = {
      "pid": os.getpid(),
      "host": socket.gethostname(),
      "started": datetime.datetime.now().isoformat(timespec="seconds"),
      "what": what,
      "argv": list(sys.argv),
  }
  f.seek(0)
  f.truncate()
  f.write(json.dumps(info) + "\n")
  f.flush()
  os.fsync(f.fileno())
  _held[key] = [f, 1]
  return path


def release(path: str) -> None:
  """Undo one `acquire` of `path`; the last one removes the file and drops the lock."""
  key = os.path.realpath(path)
  entry = _held.get(key)
  if entry is None:
    return
  entry[1] -= 1
  if entry[1] > 0:
    return
  del _held[key]
  with contextlib.suppress(FileNotFoundError):
    os.remove(path)  # while still locked: a run waiting on this file re-opens the path and finds it free
  entry[0].close()


@contextlib.contextmanager
def hold(output_dir: str, what: str, *, enabled: bool = True, log: Callable[[str], None] = print) -> Iterator[None]:
  """`with hold(config.output_dir, 'train'):` the run. `enabled=False` (processes other than 0) does nothing."""
  if not enabled:
    yield
    return
  path = acquire(output_dir, what, log=log)
  try:
    yield
  finally:
    release(path)
