"""The batched jitted pass shared by the reference pass, scoring and experiments: plan -> batches -> device -> host."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm


def batched_pass(
    fn: Callable[[Any, Any], Any],
    params: Any,
    plan: Sequence[tuple[np.ndarray, int]],
    build: Callable[[np.ndarray, int], tuple[Any, Any]],
    put: Callable[[Any], Any],
    *,
    desc: str,
    progress: bool = True,
) -> Iterator[tuple[np.ndarray, Any, Any]]:
  """Yield (rows, host batch, host outputs) for every (rows, padded length) of `plan`.

  `build(rows, pad_to)` gives (the host batch, the part that goes to the device); `put` places the latter (e.g.
  `sharding.global_batch_to_devices`); `fn(params, device batch)` is the jitted function. A tqdm bar counts rows
  (on process 0 only: every process runs the same pass).
  """
  show = progress and jax.process_index() == 0
  bar = tqdm(total=int(sum(len(rows) for rows, _ in plan)), desc=desc, disable=not show, dynamic_ncols=True)
  try:
    for rows, pad_to in plan:
      host, device = build(rows, pad_to)
      yield rows, host, jax.device_get(fn(params, put(device)))
      bar.update(len(rows))
  finally:
    bar.close()
