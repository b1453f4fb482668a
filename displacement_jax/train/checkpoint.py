"""Verified orbax checkpoints of a training run: params, opt_state, step, rng (arrays) + run meta (JSON).

One `Checkpointer` per run directory (output_dir/checkpoints). Saves are asynchronous. Once orbax has finished
a step, a background thread writes `checksums.json` into it (size and sha256 of every file of the step, written
after the data, atomically); only a step with a matching checksum file counts as a checkpoint, and only then
are the older ones beyond `keep` deleted, so a save that never completes (kill -9, a full disk) never costs the
last good checkpoint. A failed save is raised by `poll()`, which the training loop calls after every step, as
one `CheckpointWriteError` naming the directory: training stops at once.

`restore_latest(target)` takes the newest checkpoint that passes its checksum, restores (arrays laid out like
`target`: a pytree of arrays or ShapeDtypeStructs with `.sharding`) and holds only finite values; each one that
fails is reported in one line ("checkpoint 40 is corrupt (<reason>); resuming from 35") and moved aside
to checkpoints_corrupt/, and none usable raises `NoUsableCheckpointError` (a `UsageError`: exit status 2).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
import traceback
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from displacement_jax import rundir
from displacement_jax.errors import UsageError

CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "checkpoints_corrupt"  # beside CHECKPOINT_DIR: checkpoints that failed verification, kept for a look
CHECKSUM_FILE = "checksums.json"
ERROR_LOG = "checkpoint_errors.log"  # beside CHECKPOINT_DIR: orbax's own error records (tracebacks) of a failed save
_HEADROOM = 64 << 10  # bytes a save needs beyond its arrays (metadata, meta, checksums)


class NoUsableCheckpointError(UsageError):
  """--resume found no checkpoint that verifies, restores and is finite."""


class CheckpointWriteError(OSError):
  """An (asynchronous) checkpoint save failed, e.g. a full disk; the message names the directory."""


def _abstract(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) for every array leaf of `tree`."""

  def leaf(x):
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

  return jax.tree.map(leaf, tree)


def short_reason(error: BaseException, limit: int = 160) -> str:
  """One line for an exception from orbax / tensorstore / the OS (the errno text when there is one)."""
  text = f"{error}"
  for marker in ("No space left on device", "Disk quota exceeded", "Permission denied", "Read-only file system"):
    if marker in text:
      return marker
  if isinstance(error, OSError) and error.strerror:
    return error.strerror
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  line = lines[0] if lines else type(error).__name__
  return line if len(line) <= limit else line[: limit - 3] + "..."


# ------------------------------------------------------------------------------------------------ checksums


def write_checksums(step_dir: str) -> None:
  """checksums.json of a finished step directory (rundir.write_digests: written last, atomically)."""
  rundir.write_digests(step_dir, CHECKSUM_FILE)


def verify(step_dir: str) -> str | None:
  """None when every file of `step_dir` matches its checksum, else the first reason it does not."""
  return rundir.check_digests(step_dir, CHECKSUM_FILE)


_all_finite = jax.jit(lambda leaves: [jnp.all(jnp.isfinite(x)) for x in leaves])


def first_nonfinite(tree: Any) -> str | None:
  """The path of the first floating leaf of `tree` holding a NaN/inf, or None."""
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  floating = [(p, x) for p, x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]
  flags = jax.device_get(_all_finite([x for _, x in floating]))
  for (path, _), ok in zip(floating, flags):
    if not bool(np.asarray(ok)):
      return jax.tree_util.keystr(path)
  return None


def _mb(n: float) -> str:
  return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.0f} kB"


class _ErrorSink(logging.Filter):
  """Keeps the noise of a failed orbax save off stderr (orbax's error records with tracebacks from its threads,
  asyncio's "Task exception was never retrieved", tensorstore's "Event loop is closed" printed from its threads,
  some of them long after the save): they go to the error log of the newest Checkpointer, and the run reports
  the failure in one line naming it. Installed once per process; anything else passes through untouched."""

  path: str | None = None
  _installed = False

  def __init__(self):
    super().__init__()
    self._format = logging.Formatter("%(asctime)s %(levelname)s %(threadName)s %(pathname)s:%(lineno)d %(message)s")
    self._previous_hook, self._previous_unraisable = sys.excepthook, sys.unraisablehook

  @classmethod
  def install(cls, path: str) -> None:
    cls.path = path
    if not cls._installed:
      sink = cls()
      logging.getLogger("absl").addFilter(sink)
      logging.getLogger("asyncio").addFilter(sink)
      sys.excepthook, sys.unraisablehook = sink.excepthook, sink.unraisablehook
      cls._installed = True

  def _write(self, text: str) -> None:
    try:
      with open(self.path, "a") as f:
        f.write(text + "\n")
    except (OSError, TypeError):  # the disk that failed the save may not take the log either
      pass

  def filter(self, record: logging.LogRecord) -> bool:
    ours = f"{os.sep}orbax{os.sep}" in record.pathname or (record.name == "asyncio" and "orbax" in record.getMessage())
    if record.levelno < logging.ERROR or not ours:
      return True
    self._write(self._format.format(record))
    return False

  @staticmethod
  def _loop_closed(exc_type: Any, exc: Any) -> bool:
    return exc_type is RuntimeError and str(exc) == "Event loop is closed"

  def excepthook(self, exc_type, exc, tb) -> None:
    if self._loop_closed(exc_type, exc):
      self._write("".join(traceback.format_exception(exc_type, exc, tb)))
      return
    self._previous_hook(exc_type, exc, tb)

  def unraisablehook(self, unraisable: Any) -> None:
    if self._loop_closed(unraisable.exc_type, unraisable.exc_value):
      self._write(
          "".join(traceback.format_exception(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback))
      )
      return
    self._previous_unraisable(unraisable)


# --------------------------------------------------------------------------------------------- the manager


class Checkpointer:
  """`orbax.checkpoint.CheckpointManager` with items 'state' (pytree) and 'meta' (JSON), verified (module doc)."""

  def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True):
    if keep < 1:
      raise ValueError(f"checkpoint.keep must be >= 1, got {keep}")
    self.directory = os.path.abspath(directory)
    self.keep, self.async_save = int(keep), bool(async_save)
    # max_to_keep=None: old steps are deleted here, only once a newer one is verified.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None, create=True, enable_async_checkpointing=async_save, cleanup_tmp_directories=True
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
    self.error_log = os.path.join(os.path.dirname(self.directory), ERROR_LOG)
    _ErrorSink.install(self.error_log)
    self._finisher: threading.Thread | None = None
    self._error: CheckpointWriteError | None = None
    self._reported = False
    self._checked: dict[int, str | None] = {}

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(int(step)))

  def latest_step(self) -> int | None:
    """The newest step orbax has (finished or in flight), or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(int(s) for s in self._manager.all_steps())

  def verified_steps(self) -> list[int]:
    """Steps whose checksum file exists (written after the save finished), oldest first (not re-hashed)."""
    return [s for s in self.all_steps() if os.path.exists(os.path.join(self.step_dir(s), CHECKSUM_FILE))]

  # ---- saving

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Save `state` (pytree of arrays) and `meta` (JSON-able dict) at `step`; verified in the background.

    A disk without room for the step's arrays fails here, before orbax writes a byte (single-process runs).
    A save that fails in the background is raised by `poll` or by the next `save` / `wait`.
    """
    self.wait()
    # orbax may compress: refuse only what cannot fit at 2x compression (a tighter disk fails in orbax, reported
    # by poll / the next save)
    need = sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes")) // 2 + _HEADROOM
    free = shutil.disk_usage(self.directory).free
    if jax.process_count() == 1 and free < need:
      raise CheckpointWriteError(
          f"checkpoint {step} could not be written to {self.directory} (No space left on device: it needs at "
          f"least {_mb(need)}, {_mb(free)} are free)"
      )
    self._manager.save(
        int(step),
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=True,
    )
    if self.async_save:
      self._finisher = threading.Thread(target=self._finish, args=(int(step),), name="checkpoint-verify", daemon=True)
      self._finisher.start()
    else:
      self._finish(int(step))
      self.poll()

  def _finish(self, step: int) -> None:
    """Wait for orbax, write the step's checksums, then delete steps beyond `keep` (errors kept for `poll`)."""
    try:
      self._manager.wait_until_finished()
      self._manager.check_for_errors()
      step_dir = self.step_dir(step)
      if not os.path.isdir(step_dir):
        raise CheckpointWriteError(f"the save of step {step} did not produce {step_dir}")
      if jax.process_index() == 0:
        write_checksums(step_dir)
      # `step` is verified by construction: every process takes the same decision without waiting for the file
      verified = sorted({s for s in self.verified_steps() if s != step} | {step})
      for old in verified[: max(len(verified) - self.keep, 0)]:
        self._manager.delete(old)
    except BaseException as e:  # pylint: disable=broad-except  (reported by poll / wait in the main thread)
      self._error = CheckpointWriteError(
          f"checkpoint {step} could not be written to {self.directory} ({short_reason(e)}; orbax's records: "
          f"{self.error_log})"
      )
      self._error.__cause__ = e
      logging.info("checkpoint %d failed", step, exc_info=e)

  def poll(self) -> None:
    """Raise the CheckpointWriteError of a failed save, if any (non-blocking; call it after every step)."""
    if self._error is not None and not self._reported:
      self._reported = True
      raise self._error

  def wait(self) -> None:
    """Block until the pending save is written and verified; raise its error."""
    if self._finisher is not None:
      self._finisher.join()
      self._finisher = None
    self.poll()

  def close(self, *, raise_errors: bool = True) -> None:
    """Wait for the pending save, then close orbax. `raise_errors=False` while another error is propagating."""
    try:
      if self._finisher is not None:
        self._finisher.join()
        self._finisher = None
      if raise_errors:
        self.poll()
    finally:
      try:
        self._manager.close()
      except Exception:  # pylint: disable=broad-except  (the same failed save, already reported by wait/poll)
        if raise_errors and self._error is None:
          raise

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close(raise_errors=exc[0] is None)

  # ---- restoring

  def read_meta(self, step: int) -> dict[str, Any]:
    """The JSON meta of `step` (no arrays read)."""
    restored = self._manager.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored["meta"])

  def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict[str, Any], int]:
    """(state, meta, step) of `step` (default: latest), arrays laid out like `target`; not verified."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise NoUsableCheckpointError(f"no checkpoint to resume from in {self.directory}")
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(target)), meta=ocp.args.JsonRestore())
    )
    return restored["state"], dict(restored["meta"]), int(step)

  def check(self, step: int) -> str | None:
    """None when `step` passes its checksum (`verify`), else why not; memoised, so each step is hashed once."""
    if step not in self._checked:
      self._checked[step] = verify(self.step_dir(step))
    return self._checked[step]

  def newest_meta(self) -> tuple[int, dict[str, Any]]:
    """(step, meta) of the newest checkpoint that passes its checksum, read before anything is loaded (for the
    checks of --resume); NoUsableCheckpointError when there is none."""
    bad = []
    for step in sorted(self.all_steps(), reverse=True):
      reason = self.check(step)
      if reason is None:
        try:
          return step, self.read_meta(step)
        except Exception as e:  # pylint: disable=broad-except  (restore_latest reports it and falls back)
          reason = f"restore failed: {short_reason(e)}"
      bad.append((step, reason))
    raise self._no_usable(bad)

  def _no_usable(self, bad: list[tuple[int, str]]) -> NoUsableCheckpointError:
    if not bad:
      return NoUsableCheckpointError(f"--resume: no checkpoint in {self.directory}")
    listed = "; ".join(f"checkpoint {s} is corrupt ({r})" for s, r in bad)
    return NoUsableCheckpointError(
        f"--resume: no usable checkpoint in {self.directory}: {listed}; start afresh with --config.overwrite=True"
    )

  def restore_latest(self, target: Any, *, log: Callable[[str], None] = print) -> tuple[Any, dict[str, Any], int]:
    """(state, meta, step) of the newest usable checkpoint: checksum, restore and finiteness (module docstring)."""
    bad = []
    for step in sorted(self.all_steps(), reverse=True):
      reason = self.check(step)
      if reason is None:
        try:
          state, meta, step = self.restore(target, step)
          where = first_nonfinite(state)
          reason = None if where is None else f"non-finite values in {where}"
        except Exception as e:  # pylint: disable=broad-except  (any failure to read it: the next older one)
          reason = f"restore failed: {short_reason(e)}"
      if reason is not None:
        bad.append((step, reason))
        continue
      for bad_step, why in bad:
        log(f"checkpoint {bad_step} is corrupt ({why}); resuming from {step}")
      self.set_aside([s for s, _ in bad])
      return state, meta, step
    raise self._no_usable(bad)

  def set_aside(self, steps: list[int]) -> None:
    """Move the step directories `steps` to checkpoints_corrupt/ (so a resumed run can save those steps again)."""
    if not steps:
      return
    if jax.process_index() == 0:
      aside = os.path.join(os.path.dirname(self.directory), CORRUPT_DIR)
      os.makedirs(aside, exist_ok=True)
      for step in steps:
        dest, n = os.path.join(aside, str(step)), 1
        while os.path.exists(dest):
          dest, n = os.path.join(aside, f"{step}.{n}"), n + 1
        shutil.move(self.step_dir(step), dest)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top  (multi-host only)

      multihost_utils.sync_global_devices("checkpoint: corrupt steps set aside")
    for step in steps:
      self._checked.pop(step, None)
    self._manager.reload()
