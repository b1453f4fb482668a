"""Device meshes and sharding rules: ('data', 'fsdp', 'tensor') mesh, path-based param specs, batch sharding.

Rules (by param path, see DESIGN.md param tree):

  q_proj / k_proj / v_proj / gate_proj / up_proj kernel [D, X]  -> P('fsdp', 'tensor')
  o_proj / down_proj kernel                         [X, D]      -> P('tensor', 'fsdp')
  embed_tokens embedding                            [V, D]      -> P('tensor', 'fsdp')
  lm_head kernel                                    [D, V]      -> P('fsdp', 'tensor')
  norms, biases, anything else                                  -> replicated

A dim whose size is not divisible by its mesh axis size falls back to None (replicated along that axis).
Batches are split over ('data', 'fsdp') jointly, so FSDP is data parallel with sharded params.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES: tuple[str, str, str] = ("data", "fsdp", "tensor")

_IN_OUT = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # [D, X] kernels
_OUT_IN = ("o_proj", "down_proj")  # [X, D] kernels


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
  """A Mesh with axes ('data', 'fsdp', 'tensor'); one size may be -1 (= all remaining devices).

  Raises ValueError when the sizes are not positive / -1, or their product does not match the device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
  for name, size in sizes.items():
    if not isinstance(size, (int, np.integer)) or (size != -1 and size < 1):
      raise ValueError(f"make_mesh: {name}={size!r} must be a positive int or -1")
  free = [k for k, v in sizes.items() if v == -1]
  if len(free) > 1:
    raise ValueError(f"make_mesh: only one axis may be -1, got {', '.join(f'{k}=-1' for k in free)}")
  fixed = math.prod(int(v) for v in sizes.values() if v != -1)
  if free:
    if n % fixed:
      raise ValueError(
          f"make_mesh: {' x '.join(f'{k}={v}' for k, v in sizes.items() if v != -1)} = {fixed} does not divide "
          f"the {n} available devices"
      )
    sizes[free[0]] = n // fixed
  shape = tuple(int(sizes[a]) for a in AXES)
  if math.prod(shape) != n:
    raise ValueError(
        f"make_mesh: data={shape[0]} x fsdp={shape[1]} x tensor={shape[2]} = {math.prod(shape)} != {n} available "
        "devices (use -1 for one axis to take the remaining devices)"
    )
  try:  # topology-aware order on TPU/GPU; plain reshape elsewhere
    from jax.experimental import mesh_utils

    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # pylint: disable=broad-except
    grid = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(grid, AXES)


def _key_name(key: Any) -> str:
  """A path entry (str, DictKey, GetAttrKey, SequenceKey) as a string."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _fit(spec: tuple[str | None, ...], shape: Sequence[int], mesh: Any) -> P:
  """`spec` with every axis that does not divide its dim replaced by None."""
  out = []
  for axis, dim in zip(spec, shape):
    out.append(axis if axis is not None and dim % int(mesh.shape[axis]) == 0 else None)
  while out and out[-1] is None:
    out.pop()
  return P(*out)


def param_partition_spec(path: Sequence[Any], shape: Sequence[int], mesh: Any) -> P:
  """The PartitionSpec of the param at `path` (tuple of names or a jax key path) with `shape` on `mesh`."""
  names = tuple(_key_name(k) for k in path)
  shape = tuple(int(s) for s in shape)
  if len(names) >= 2 and len(shape) == 2:
    module, leaf = names[-2], names[-1]
    if leaf == "kernel" and module in _IN_OUT + ("lm_head",):
      return _fit(("fsdp", "tensor"), shape, mesh)
    if leaf == "kernel" and module in _OUT_IN:
      return _fit(("tensor", "fsdp"), shape, mesh)
    if leaf == "embedding" and module == "embed_tokens":
      return _fit(("tensor", "fsdp"), shape, mesh)
  return P()


def param_shardings(params_or_shape_tree: Any, mesh: Mesh) -> Any:
  """A pytree of NamedSharding matching `params_or_shape_tree` (arrays, ShapeDtypeStructs or shape tuples)."""

  def one(path, leaf):
    shape = leaf if isinstance(leaf, tuple) else getattr(leaf, "shape", None)
    if shape is None:
      shape = np.shape(leaf)
    return NamedSharding(mesh, param_partition_spec(path, shape, mesh))

  is_shape = lambda x: isinstance(x, tuple) and all(isinstance(d, (int, np.integer)) for d in x)
  return jax.tree_util.tree_map_with_path(one, params_or_shape_tree, is_leaf=is_shape)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dim split over ('data', 'fsdp'); other dims replicated."""
  return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
  """Fully replicated on `mesh`."""
  return NamedSharding(mesh, P())


def shard_params(params: Any, mesh: Mesh) -> Any:
  """`params` placed on `mesh` with `param_shardings`."""
  return jax.device_put(params, param_shardings(params, mesh))


_MULTI_PROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")


def _env_int(name: str) -> int:
  try:
    return int(os.environ.get(name, "1"))
  except ValueError:
    return 1


def multi_process_env() -> bool:
  """True when the environment says this is one process of several (coordinator / TPU pod / SLURM / MPI)."""
  if any(os.environ.get(k) for k in _MULTI_PROCESS_ENV):
    return True
  if len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]) > 1:
    return True
  return any(_env_int(k) > 1 for k in ("JAX_NUM_PROCESSES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))


def initialize_distributed_if_needed() -> bool:
  """Call jax.distributed.initialize() when the environment indicates several processes; no-op on one host.

  Must run before any other JAX call touches the devices. Returns True when it initialised.
  """
  if not multi_process_env():
    return False
  if jax.distributed.is_initialized():
    return False
  jax.distributed.initialize()  # reads coordinator / process id from the environment (TPU, SLURM, MPI, JAX_*)
  return True


def host_local_batch_to_global(batch: Any, mesh: Mesh) -> Any:
  """Assemble each host's slice of a batch (pytree of [B_local, ...] arrays) into global arrays.

  The global batch is the concatenation of the process-local batches along dim 0, sharded with
  `batch_sharding(mesh)`; on one host this is a plain device_put.
  """
  sharding = batch_sharding(mesh)
  dp = int(mesh.shape["data"] * mesh.shape["fsdp"])

  def one(path, x):
    x = np.asarray(x)
    if x.ndim == 0:
      raise ValueError(f"host_local_batch_to_global: batch entry {jax.tree_util.keystr(path)} is a scalar")
    global_b = x.shape[0] * jax.process_count()
    if global_b % dp:
      raise ValueError(
          f"host_local_batch_to_global: batch entry {jax.tree_util.keystr(path)} has shape {x.shape}; the global "
          f"batch {global_b} is not divisible by data x fsdp = {dp}"
      )
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree_util.tree_map_with_path(one, batch)


def data_parallel_size(mesh: Mesh) -> int:
  """Devices a batch is split over: mesh.data x mesh.fsdp (all hosts)."""
  return int(mesh.shape["data"] * mesh.shape["fsdp"])


def host_local_rows(global_batch: int) -> slice:
  """This host's contiguous share of a global batch (per-host data shards)."""
  n = jax.process_count()
  if global_batch % n:
    raise ValueError(f"global batch {global_batch} does not split over {n} hosts")
  per = global_batch // n
  return slice(jax.process_index() * per, (jax.process_index() + 1) * per)


def global_batch_to_devices(batch: Any, mesh: Mesh) -> Any:
  """Global arrays from a global numpy batch that every host holds: each host places only its own rows."""
  local = host_local_rows(next(iter(jax.tree.leaves(batch))).shape[0])
  return host_local_batch_to_global(jax.tree.map(lambda x: np.asarray(x)[local], batch), mesh)


def mesh_from_config(mesh_config: Any) -> Mesh:
  """`jax.distributed` initialised when the environment says so, then `make_mesh(data, fsdp, tensor)` of a
  config's `mesh` block."""
  initialize_distributed_if_needed()
  return make_mesh(data=int(mesh_config.data), fsdp=int(mesh_config.fsdp), tensor=int(mesh_config.tensor))
