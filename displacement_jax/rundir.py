"""The files of a run directory: every one written atomically, every one read back verified.

Writing: `atomic(path)` gives a temp file of this process's own beside `path`; when the block succeeds the file
is fsynced, renamed over `path` and the directory fsynced, so a kill or a power cut leaves the old file or the
new one, never half of one. `write_json`, `write_jsonl`, `write_npz` and `write_bytes` go through it.

Reading: `read_json`, `read_jsonl` and `read_npz` raise `CorruptFileError`, one line naming the file (and the
line) and what is wrong, instead of a parser's traceback; `salvage_jsonl` keeps the good lines of an appended
log and reports the others. `seal` / `unseal` put a checksum on each row of an appended file, so that a row
cut by a kill or edited by hand is recomputed rather than trusted. A directory written in pieces (a checkpoint
step, an HF export) is complete only once `write_digests` has put its manifest (size and sha256 of every file)
in it, last; `check_digests` re-hashes against that manifest.

What a run was: run.json (`write_run` / `read_run`: 'running', 'complete' only once every output is written, or
'failed'; the run's identity, compared by --resume) and the hashes its identity is made of (`hash_pairs` of
tokenized pairs, `hash_examples` of rows as loaded, `hash_arrays`); `identity_changes` lists what differs.

One run per output directory: `hold(output_dir, what)` locks output_dir/run.lock for the length of a run. The
lock is an exclusive `flock` on the file, so the kernel releases it when its process dies, kill -9 included; the
file's content (pid, host, start time, command) names the holder. A second run into the same directory raises
`RunLockedError` (a `UsageError`: exit status 2) at once, before loading anything. A lock file whose `flock` is
free but which still names a process is the leftover of a run that died: it is taken over with a warning naming
that run. A clean exit removes the file. Within one process the lock is re-entrant (a pipeline may hold its
directory while a stage it runs holds the same one).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import zipfile
import zlib
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np

from displacement_jax.errors import UsageError

_CHUNK = 8 << 20
SEAL_KEY = "_sha256"  # the checksum field of a sealed row


class CorruptFileError(ValueError):
  """A file of a run that cannot be read back as written: the message names the file and what is wrong."""

  def __init__(self, path: str, reason: str):
    self.path, self.reason = path, reason
    super().__init__(f"{path}: {reason}")


def _first_line(error: BaseException) -> str:
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return lines[0] if lines else type(error).__name__


# ------------------------------------------------------------------------------------------------- writing


def fsync_dir(directory: str) -> None:
  """Flush a directory's entries (a rename into it) to disk; a no-op where directories cannot be opened."""
  with contextlib.suppress(OSError):
    fd = os.open(directory or ".", os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


@contextlib.contextmanager
def atomic(path: str) -> Iterator[str]:
  """`with atomic(path) as tmp:` write `tmp`; when the block succeeds it is fsynced and renamed over `path` (the
  directory fsynced too), else removed. An OSError without a file name (a full disk) is re-raised naming `path`."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = f"{path}.{os.getpid()}.tmp{os.path.splitext(path)[1]}"
  try:
    yield tmp
    with open(tmp, "rb+") as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(directory)
  except BaseException as e:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    if isinstance(e, OSError) and e.filename is None and e.errno is not None:
      raise OSError(e.errno, e.strerror, path) from e
    raise


def write_bytes(path: str, data: bytes) -> str:
  """`data` at `path`, atomically; returns `path`."""
  with atomic(path) as tmp, open(tmp, "wb") as f:
    f.write(data)
  return path


def write_json(path: str, obj: Any, *, indent: int | None = 1) -> str:
  """`obj` as JSON at `path`, atomically; returns `path`."""
  with atomic(path) as tmp, open(tmp, "w") as f:
    json.dump(obj, f, indent=indent)
  return path


def write_jsonl(path: str, rows: Iterable[Any]) -> str:
  """One JSON object per line at `path`, atomically; returns `path`."""
  with atomic(path) as tmp, open(tmp, "w") as f:
    f.writelines(json.dumps(row) + "\n" for row in rows)
  return path


def write_npz(path: str, arrays: Mapping[str, Any]) -> str:
  """Arrays as an uncompressed npz at `path` (each member carries its zip CRC-32), atomically; returns `path`."""
  with atomic(path) as tmp:
    with open(tmp, "wb") as f:
      np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
  return path


def replace_dir(tmp: str, path: str) -> str:
  """Put the finished directory `tmp` in place of `path` (an earlier one removed first), the parent fsynced: a
  reader finds the old directory, none, or the new one whole. Returns `path`."""
  if os.path.exists(path):
    shutil.rmtree(path)
  os.replace(tmp, path)
  fsync_dir(os.path.dirname(os.path.abspath(path)))
  return path


# ------------------------------------------------------------------------------------------------- reading


def read_json(path: str) -> Any:
  """The JSON value of `path`; CorruptFileError when it does not parse (cut short by a kill, edited)."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise CorruptFileError(path, f"not valid JSON ({_first_line(e)})") from e


def salvage_jsonl(path: str) -> tuple[list[Any], list[int]]:
  """(rows, bad): the rows of every line that parses and the 1-based numbers of those that do not (a last line
  without its newline counts as cut short, even when what is there parses)."""
  with open(path, "rb") as f:
    lines = f.read().split(b"\n")
  rows, bad = [], []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    if number == len(lines):  # no newline after it: the write was cut
      bad.append(number)
      continue
    try:
      rows.append(json.loads(line))
    except (ValueError, UnicodeDecodeError):
      bad.append(number)
  return rows, bad


def read_jsonl(path: str) -> list[Any]:
  """Every row of a JSON-lines file; CorruptFileError naming the first line that does not parse."""
  rows, bad = salvage_jsonl(path)
  if bad:
    raise CorruptFileError(path, f"line {bad[0]} is not valid JSON (cut short or edited)")
  return rows


def read_npz(path: str) -> dict[str, np.ndarray]:
  """Every array of an npz (all members read, so each zip CRC-32 is checked); CorruptFileError when one fails."""
  try:
    with np.load(path, allow_pickle=False) as data:
      return {k: np.asarray(data[k]) for k in data.files}
  except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, KeyError, OSError) as e:
    if isinstance(e, FileNotFoundError):
      raise
    raise CorruptFileError(path, f"not a readable npz ({_first_line(e)})") from e


# ------------------------------------------------------------------------------------------- sealed rows


def _row_digest(row: Mapping[str, Any]) -> str:
  return hashlib.sha256(json.dumps(row, sort_keys=True).encode()).hexdigest()[:16]


def seal(row: Mapping[str, Any]) -> dict[str, Any]:
  """`row` with its checksum (SEAL_KEY) added, for a file whose rows are trusted on a later read."""
  return {**row, SEAL_KEY: _row_digest(row)}


def unseal(row: Any) -> dict[str, Any] | None:
  """The row without its checksum, or None when it has none or it does not match (the row was edited)."""
  if not isinstance(row, dict) or not isinstance(row.get(SEAL_KEY), str):
    return None
  body = {k: v for k, v in row.items() if k != SEAL_KEY}
  return body if _row_digest(body) == row[SEAL_KEY] else None


# ------------------------------------------------------------------------------ directories in several files


def file_digests(directory: str, *, skip: str = "") -> dict[str, list[Any]]:
  """{relative path: [size, sha256]} of every file under `directory` but `skip` (the manifest) and its temps."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, directory)
      if skip and (rel == skip or rel.startswith(skip + ".")):
        continue
      digest = hashlib.sha256()
      with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
          digest.update(chunk)
      out[rel] = [os.path.getsize(path), digest.hexdigest()]
  return dict(sorted(out.items()))


def write_digests(directory: str, manifest: str, **facts: Any) -> str:
  """The manifest of a finished directory (every file's size and sha256, and `facts`), written last and
  atomically: its presence is the directory's completion marker. Returns its path."""
  return write_json(os.path.join(directory, manifest), {"files": file_digests(directory, skip=manifest), **facts})


def read_manifest(directory: str, manifest: str) -> dict[str, Any] | None:
  """The manifest of `directory`, or None when there is none or it does not parse."""
  try:
    record = read_json(os.path.join(directory, manifest))
  except (OSError, CorruptFileError):
    return None
  return record if isinstance(record, dict) and isinstance(record.get("files"), dict) else None


def check_digests(directory: str, manifest: str) -> str | None:
  """None when every file of `directory`'s manifest is there with its size and sha256, else the first reason not."""
  path = os.path.join(directory, manifest)
  if not os.path.exists(path):
    return f"no {manifest}: its save never completed"
  try:
    expected = read_json(path)["files"]
    sizes = {rel: int(size) for rel, (size, _) in expected.items()}
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f"unreadable {manifest} ({e.reason if isinstance(e, CorruptFileError) else _first_line(e)})"
  for rel, size in sizes.items():
    file = os.path.join(directory, rel)
    if not os.path.isfile(file):
      return f"{rel} is missing"
    actual = os.path.getsize(file)
    if actual != size:
      return f"{rel} has {actual} bytes, {size} were written"
  actual_digests = file_digests(directory, skip=manifest)
  for rel, (_, sha) in expected.items():
    if actual_digests.get(rel, [None, None])[1] != sha:
      return f"{rel} does not match its checksum"
  return None


# -------------------------------------------------------------------------- run.json and a run's identity

RUN_FILE = "run.json"


def read_run(output_dir: str) -> dict[str, Any] | None:
  """run.json of `output_dir`, or None; CorruptFileError naming it when it does not parse."""
  path = os.path.join(output_dir, RUN_FILE)
  if not os.path.exists(path):
    return None
  record = read_json(path)
  if not isinstance(record, dict):
    raise CorruptFileError(path, f"not a run record (a JSON object), got {type(record).__name__}")
  return record


def write_run(output_dir: str, status: str, identity: dict[str, Any], **fields: Any) -> dict[str, Any]:
  """run.json: `status` ('running' from the start, 'complete' only once every output is written), what was
  scored (`identity`: config and data, compared by --resume), the process and times."""
  record = read_run(output_dir) if status != "running" else None
  record = dict(record or {"started": _now(), "pid": os.getpid(), "host": socket.gethostname()})
  record.update(status=status, **identity, **fields)
  if status == "complete":
    record["finished"] = _now()
  write_json(os.path.join(output_dir, RUN_FILE), record)
  return record


def _now() -> str:
  return datetime.datetime.now().isoformat(timespec="seconds")


def hash_arrays(arrays: Iterable[np.ndarray]) -> str:
  """sha256 over the dtype, shape and bytes of each array, in order."""
  digest = hashlib.sha256()
  for arr in arrays:
    arr = np.ascontiguousarray(arr)
    digest.update(f"{arr.dtype.str}{arr.shape}".encode())
    digest.update(arr.tobytes())
  return digest.hexdigest()


def hash_pairs(pairs: Iterable[Any]) -> str:
  """sha256 over every field of every tokenized pair (dataclass / namedtuple / object attributes), in order.

  Token ids cover the data rows, the tokenizer, the format and max_length: any change there changes the key.
  """
  digest = hashlib.sha256()
  for pair in pairs:
    fields = (
        pair._asdict()
        if hasattr(pair, "_asdict")
        else (
            {f.name: getattr(pair, f.name) for f in dataclasses.fields(pair)}
            if dataclasses.is_dataclass(pair)
            else vars(pair)
        )
    )
    for name in sorted(fields):
      value = fields[name]
      digest.update(name.encode())
      if isinstance(value, (np.ndarray, list, tuple)) and _is_numeric(value):
        arr = np.ascontiguousarray(np.asarray(value))
        digest.update(f"{arr.dtype.str}{arr.shape}".encode())
        digest.update(arr.tobytes())
      else:
        digest.update(repr(value).encode())
  return digest.hexdigest()


def _is_numeric(value: Any) -> bool:
  try:
    return np.asarray(value).dtype.kind in "biuf"
  except (ValueError, TypeError):
    return False


def hash_examples(examples: Iterable[Any]) -> str:
  """sha256 over (index, prompt, chosen, rejected) of every preference example as loaded, in order."""
  digest = hashlib.sha256()
  for ex in examples:
    digest.update(json.dumps([ex.index, ex.prompt, ex.chosen, ex.rejected], sort_keys=True).encode() + b"\n")
  return digest.hexdigest()


def identity_changes(old: Mapping[str, Any], new: Mapping[str, Any], keys: Iterable[str] | None = None) -> list[str]:
  """'key old -> new' (reprs; '<unset>' where a side lacks the key) for every key of `keys` (default: both
  sides' keys, sorted) whose value differs: what a --resume refuses or reports."""
  keys = sorted(set(old) | set(new)) if keys is None else list(keys)
  return [f"{k} {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in keys if old.get(k) != new.get(k)]


# ------------------------------------------------------------------------------------- one run per directory

LOCK_FILE = "run.lock"
_held: dict[str, list[Any]] = {}  # realpath of a lock file -> [open file, hold count] of this process


class RunLockedError(UsageError):
  """Another live run holds the output directory."""


def describe_holder(info: dict[str, Any]) -> str:
  """'pid 123 on host h, started 2026-12-01T10:00:00 (train)' from a lock file's content."""
  what = f" ({info['what']})" if info.get("what") else ""
  return f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started {info.get('started', '?')}{what}"


def _read_lock(f: Any) -> dict[str, Any]:
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
      info = _read_lock(f)
      f.close()
      raise RunLockedError(
          f"output_dir {output_dir} is in use by another run ({describe_holder(info)}; lock file {path}); wait for it to "
          "finish or use another output_dir"
      ) from None
    try:
      same_file = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
    except FileNotFoundError:
      same_file = False
    if same_file:
      break
    f.close()  # the holder removed the file between our open and our lock: lock the new one
  stale = _read_lock(f)
  if stale:
    log(f"WARNING taking over the stale lock {path} of a run that is gone ({describe_holder(stale)})")
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
