"""Orbax checkpoints of a training run: params, opt_state, step, rng (arrays) + data-iterator state (JSON).

One `Checkpointer` per run directory (output_dir/checkpoints). Saves are asynchronous and keep the newest
`keep` steps; `restore(target)` places arrays with the shardings of `target` (a pytree of arrays or
ShapeDtypeStructs with `.sharding`), so a run resumes on the same mesh layout it trains on.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"


def _abstract(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) for every array leaf of `tree`."""

  def leaf(x):
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

  return jax.tree.map(leaf, tree)


class Checkpointer:
  """Thin wrapper over `orbax.checkpoint.CheckpointManager` with items 'state' (pytree) and 'meta' (JSON)."""

  def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True):
    if keep < 1:
      raise ValueError(f"checkpoint.keep must be >= 1, got {keep}")
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    """The newest complete checkpoint step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict[str, Any], *, force: bool = True) -> bool:
    """Save `state` (pytree of arrays) and `meta` (JSON-able dict) at `step` (asynchronously)."""
    return self._manager.save(
        int(step),
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=force,
    )

  def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict[str, Any], int]:
    """(state, meta, step) of `step` (default: latest), arrays laid out like `target`."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint to resume from in {self.directory}")
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(target)), meta=ocp.args.JsonRestore())
    )
    return restored["state"], dict(restored["meta"]), int(step)

  def wait(self) -> None:
    """Block until pending asynchronous saves are written."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
