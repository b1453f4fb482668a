"""SIGTERM and SIGINT during a run: `with Interrupts() as interrupts:` turns them into `errors.Interrupted`.

Outside a step loop a signal raises `Interrupted` at once (nothing is half-done that a checkpoint could keep).
Inside one (`with interrupts.deferred():`) the first signal is only noted: the loop finishes the step it is in,
asks `pending()` after each step, writes a checkpoint and raises `Interrupted` itself; a second signal there
stops at once. With several processes `pending()` is agreed between them (all stop after the same step).
Handlers are installed only in the main thread (Python delivers signals there) and restored on exit.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from displacement_jax.errors import Interrupted

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def signal_name(signum: int) -> str:
  return signal.Signals(signum).name


class Interrupts:
  """Catches SIGTERM / SIGINT for the length of a `with` block (see the module docstring)."""

  def __init__(self) -> None:
    self.signum = 0
    self._defer = False
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> "Interrupts":
    if threading.current_thread() is threading.main_thread():
      for signum in SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc: Any) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

  def _handle(self, signum: int, frame: Any) -> None:  # pylint: disable=unused-argument
    if self._defer and not self.signum:
      self.signum = signum
      return
    if self.signum:
      raise Interrupted(
          signum, f"stopped at once by a second {signal_name(signum)}; --resume continues from the newest checkpoint"
      )
    raise Interrupted(
        signum,
        f"stopped by {signal_name(signum)} outside a training step; --resume continues from the newest checkpoint",
    )

  @contextlib.contextmanager
  def deferred(self) -> Iterator[None]:
    """Within the block the first signal only sets `signum` (the step loop acts on it between steps)."""
    self._defer = True
    try:
      yield
    finally:
      self._defer = False
    if self.signum:  # came after the loop's last look: act on it now
      raise Interrupted(
          self.signum, f"stopped by {signal_name(self.signum)}; --resume continues from the newest checkpoint"
      )

  def pending(self) -> int:
    """The signal to stop for (0: none), the same on every process."""
    if jax.process_count() == 1:
      return self.signum
    return int(np.max(multihost_utils.process_allgather(np.asarray(self.signum, np.int32))))
