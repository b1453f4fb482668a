"""Device meshes and sharding rules: ('data', 'fsdp', 'tensor') mesh, path-based param specs, batch sharding.

Rules (by param path, see DESIGN.md param tree):

  q_proj / k_proj / v_proj / gate_proj / up_proj kernel [D, X]  -> P('fsdp', 'tensor')
  o_proj / down_proj kernel                         [X, D]      -> P('tensor', 'fsdp')
  embed_tokens embedding                            [V, D]      -> P('tensor', 'fsdp')
  lm_head kernel                                    [D, V]      -> P('fsdp', 'tensor')
  norms, biases, anything else                                  -> replicated

A dim whose size is not divisible by its mesh axis size falls back to None (replicated along that axis).
Batches are split over ('data', 'fsdp') jointly, so FSDP is data parallel with sharded params.

Multi-process runs (a TPU pod, several GPU hosts, or launch/local.py on one machine): `mesh_from_config` calls
`jax.distributed.initialize` from the environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, or
jax's TPU / SLURM / MPI detection) with the timeouts of the config's `distributed` block and starts a `PeerWatch`,
so that one failing or killed process ends the others with a one-line message instead of a hang or an abort.
Training feeds each host its own rows (`host_local_batch_to_global`); the reference pass and scoring build the
global batch on every host and place each host's rows (`global_batch_to_devices`); process 0 writes the files.
"""

from __future__ import annotations

import atexit
import functools
import itertools
import json
import math
import os
import sys
import threading
import time
from typing import Any, Callable, Mapping, Sequence, TypeVar

import jax
import numpy as np
from jax._src import distributed as jax_distributed
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from displacement_jax.errors import UsageError

AXES: tuple[str, str, str] = ("data", "fsdp", "tensor")
T = TypeVar("T")

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
  if "layers" in names[:2] and shape:  # a decoder-layer param stacked on a leading layer axis: never split it
    inner = param_partition_spec(names[names.index("layers") + 1 :], shape[1:], mesh)
    return P(None, *inner) if len(inner) else P()
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


# ------------------------------------------------------------------------------------------- multi-process runs

# Any of these set (or JAX_NUM_PROCESSES / SLURM_NTASKS / OMPI_COMM_WORLD_SIZE > 1, or several TPU worker hostnames)
# means this is one process of several. JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID are what
# launch/local.py sets (and what any launcher may set); TPU pods, SLURM and MPI are detected by jax itself.
_MULTI_PROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")

# The seconds of the config's `distributed` block (configs/base.py) when a config has none.
DISTRIBUTED_DEFAULTS: dict[str, float] = {
    "init_timeout": 300,  # every process must join jax.distributed.initialize within this
    "heartbeat_timeout": 100,  # jax: a process silent this long is dead, every other one aborts (SIGABRT)
    "shutdown_timeout": 300,  # jax: how long an exiting process waits for the others at the exit barrier
    "peer_timeout": 60,  # PeerWatch: another process without a heartbeat this long ends this one (0: off)
}

_KV_PREFIX = "displacement_jax/"
_TICK_S = 0.5  # PeerWatch heartbeat / check period
_ACK_WAIT_S = 10.0  # process 0, leaving after a failure, waits at most this long for the others to leave first


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


def distributed_args(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
  """`jax.distributed.initialize` arguments from JAX_COORDINATOR_ADDRESS (process 0's host:port),
  JAX_NUM_PROCESSES and JAX_PROCESS_ID; what is unset is left to jax's own cluster detection (TPU, SLURM, MPI).

  jax reads only the coordinator address from the environment, so the count and id are passed explicitly.
  Raises ValueError naming the variable when one is malformed or they do not fit together.
  """
  env = os.environ if environ is None else environ
  args: dict[str, Any] = {}
  if env.get("JAX_COORDINATOR_ADDRESS", "").strip():
    args["coordinator_address"] = env["JAX_COORDINATOR_ADDRESS"].strip()
  for name, arg in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
    raw = env.get(name, "").strip()
    if raw:
      try:
        args[arg] = int(raw)
      except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
  if ("num_processes" in args) != ("process_id" in args):
    raise ValueError("JAX_NUM_PROCESSES and JAX_PROCESS_ID must be set together (the process count and this one's id)")
  if "num_processes" in args:
    n, i = args["num_processes"], args["process_id"]
    if n < 1 or not 0 <= i < n:
      raise ValueError(f"JAX_PROCESS_ID={i} must lie in [0, JAX_NUM_PROCESSES={n})")
    if "coordinator_address" not in args:
      raise ValueError(f"JAX_NUM_PROCESSES={n} needs JAX_COORDINATOR_ADDRESS=<host:port of process 0>")
  return args


def distributed_timeouts(distributed_config: Any = None) -> dict[str, float]:
  """The seconds of a config's `distributed` block (configs/base.py), DISTRIBUTED_DEFAULTS for missing fields."""
  out = dict(DISTRIBUTED_DEFAULTS)
  for name in out:
    value = distributed_config.get(name, None) if distributed_config is not None else None
    if value is None:
      continue
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
      raise ValueError(f"config.distributed.{name}={value!r} must be a number of seconds >= 0")
    if value == 0 and name != "peer_timeout":
      raise ValueError(f"config.distributed.{name}=0: only peer_timeout may be 0 (off)")
    out[name] = float(value)
  return out


def initialize_distributed_if_needed(distributed_config: Any = None) -> bool:
  """`jax.distributed.initialize` when the environment indicates several processes; no-op on one host.

  Coordinator address, process count and id come from `distributed_args` (else jax's cluster detection), the
  timeouts from `distributed_config` (a config's `distributed` block); then a `PeerWatch` starts. Must run
  before any other JAX call touches the devices. Returns True when it initialised.
  """
  if not multi_process_env() or jax.distributed.is_initialized():
    return False
  timeouts = distributed_timeouts(distributed_config)
  args = distributed_args()
  try:
    jax.distributed.initialize(
        **args,
        initialization_timeout=int(math.ceil(timeouts["init_timeout"])),
        heartbeat_timeout_seconds=int(math.ceil(timeouts["heartbeat_timeout"])),
        shutdown_timeout_seconds=int(math.ceil(timeouts["shutdown_timeout"])),
    )
  except (ValueError, TypeError) as e:
    found = ", ".join(f"{k}={os.environ[k]}" for k in sorted(os.environ) if k.startswith(("JAX_", "TPU_W", "SLURM_N")))
    raise ValueError(
        f"jax.distributed.initialize: {e} (environment: {found or 'none of JAX_*'}); a multi-process run needs "
        "JAX_COORDINATOR_ADDRESS=<host:port of process 0>, JAX_NUM_PROCESSES and JAX_PROCESS_ID, as "
        "launch/local.py sets them, or a TPU pod / SLURM / MPI environment"
    ) from e
  PeerWatch.start(timeouts["peer_timeout"])
  return True


def _kv_client() -> Any:
  """jax.distributed's key-value store client (the coordination service on process 0)."""
  return jax_distributed.global_state.client


class PeerWatch:
  """Failure propagation between the processes of a run, through jax.distributed's key-value store.

  Without it, a Python error on one process leaves the others waiting in a collective until jax's shutdown
  timeout, then every process aborts (SIGABRT), and a killed process is noticed after the heartbeat timeout.
  With it, a daemon thread of every process publishes a heartbeat every 0.5 s and ends its process (status 1,
  one line `error: process <k> failed: ...; stopping process <i>` on stderr) within about a second when another
  process reported a failure (`report_failure`), or when another process published no heartbeat for
  `peer_timeout` seconds (killed, crashed). An error that only follows from another process's end (a collective
  whose peer went away) is reported as that cause. A process that failed exits without jax's exit barrier;
  process 0, which hosts the coordination service, leaves last (after at most 10 s). A process that is alive but
  never joins a collective is not detected: run under an outer timeout (launch/local.py --timeout).
  """

  _instance: "PeerWatch | None" = None

  def __init__(self, peer_timeout: float):
    self.peer_timeout = float(peer_timeout)
    self.me, self.n = jax.process_index(), jax.process_count()
    self.failed = False
    self.exit_status = 1  # of this process when it failed: 2 for a UsageError, as the CLIs
    self._leaving = threading.Lock()
    self._stop = threading.Event()
    self._seen: dict[int, tuple[str, float]] = {}  # peer -> (last heartbeat value, when it changed)
    self._dead: set[int] = set()  # peers found without a heartbeat: they will not leave by themselves
    self._started = time.monotonic()
    self._thread = threading.Thread(target=self._loop, name="displacement_jax-peer-watch", daemon=True)

  @classmethod
  def start(cls, peer_timeout: float) -> "PeerWatch":
    if cls._instance is None:
      cls._instance = cls(peer_timeout)
      cls._instance._publish()
      cls._instance._thread.start()
      atexit.register(cls._instance._at_exit)  # runs before jax's own exit handler (registered at import)
    return cls._instance

  # ---- the key-value store: displacement_jax/<kind>/<process>

  def _key(self, kind: str) -> str:
    return f"{_KV_PREFIX}{kind}/{self.me}"

  def _set(self, kind: str, value: str) -> None:
    try:
      _kv_client().key_value_set(self._key(kind), value[:1000], allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except  (the coordinator is gone: nobody to tell)
      pass

  def _publish(self) -> None:
    _kv_client().key_value_set(self._key("alive"), f"{time.time():.3f}", allow_overwrite=True)

  def _status(self) -> dict[str, dict[int, str]]:
    """{kind: {process: value}} of every key under the prefix."""
    out: dict[str, dict[int, str]] = {}
    for key, value in _kv_client().key_value_dir_get(_KV_PREFIX):
      kind, _, proc = key[len(_KV_PREFIX) :].rpartition("/")
      if proc.isdigit():
        out.setdefault(kind, {})[int(proc)] = value
    return out

  # ---- deciding

  def verdict(self, status: Mapping[str, Mapping[int, str]], now: float, timeout: float) -> str | None:
    """Why this process must stop, from the others' keys: a reported failure, or a heartbeat unchanged for
    `timeout` seconds (0: not checked). None: carry on."""
    for kind, template in (("failed", "process {k} failed: {v}"), ("stopped", "process {k} stopped {v}")):
      for k, v in sorted(status.get(kind, {}).items()):
        if k != self.me:
          return template.format(k=k, v=v)
    finished = set(status.get("done", {})) | set(status.get("exiting", {}))
    for k in range(self.n):
      if k == self.me or k in finished:
        continue
      value = status.get("alive", {}).get(k, "")
      last, since = self._seen.get(k, (None, self._started))
      if value != last:
        self._seen[k] = (value, now)
      elif timeout > 0 and now - since > timeout:
        self._dead.add(k)
        return f"process {k} stopped responding (no heartbeat for {now - since:.0f} s): it was killed or crashed"
    return None

  def _loop(self) -> None:
    lost_since = None
    while not self._stop.wait(_TICK_S):
      if self.failed:  # the main thread reports and exits
        continue
      now = time.monotonic()
      try:
        self._publish()
        reason = self.verdict(self._status(), now, self.peer_timeout)
        lost_since = None
      except Exception as e:  # pylint: disable=broad-except  (the coordination service is gone)
        lost_since = now if lost_since is None else lost_since
        reason = f"lost the coordinator (process 0): {_first_line(e)}" if now - lost_since > 4 * _TICK_S else None
      if reason and not self.failed:
        self._exit(reason)

  def report(self, error: BaseException) -> None:
    """This process failed with `error`. When that only follows from another process's failure or end (it is
    already reported; or `error` is a runtime error of a collective and a peer's heartbeat stops), end this process
    now naming that cause; else publish the failure (the caller re-raises, the exit skips jax's barrier)."""
    self.failed = True
    self.exit_status = 2 if isinstance(error, UsageError) else 1
    runtime_error = "RuntimeError" in type(error).__name__  # jax's JaxRuntimeError / XlaRuntimeError
    deadline = time.monotonic() + (4 * _TICK_S + 1 if runtime_error else 0)
    while True:
      now = time.monotonic()
      try:
        cause = self.verdict(self._status(), now, 4 * _TICK_S if runtime_error else 0)
      except Exception as e:  # pylint: disable=broad-except
        cause = f"lost the coordinator (process 0): {_first_line(e)}" if runtime_error else None
      if cause:
        self._exit(f"{cause} (here: {type(error).__name__})")
      if now >= deadline:
        break
      time.sleep(_TICK_S / 2)
    self._set("failed", f"{type(error).__name__}: {_first_line(error)}")

  # ---- leaving

  def _exit(self, reason: str) -> None:
    """End this process (status 1) with one line naming `reason`, after telling the others."""
    if not self._leaving.acquire(blocking=False):  # the other thread is already leaving
      threading.Event().wait()
    _flush()
    print(f"error: {reason}; stopping process {self.me}", file=sys.stderr, flush=True)
    self._set("stopped", f"after {reason}")
    self._leave()  # the main thread may sit in a collective forever: no normal exit

  def _leave(self, status: int = 1) -> None:
    """os._exit(status), without jax's exit barrier. Process 0 hosts the coordination service, whose end aborts every
    process still connected: it first waits (at most 10 s) until the others have left."""
    deadline = time.monotonic() + _ACK_WAIT_S
    while self.me == 0 and time.monotonic() < deadline:
      try:
        keys = self._status()
      except Exception:  # pylint: disable=broad-except
        break
      left = set().union(self._dead, *(keys.get(k, {}) for k in ("stopped", "exiting", "done")))
      if left >= set(range(1, self.n)):
        break
      time.sleep(0.1)
    _flush()
    os._exit(status)  # pylint: disable=protected-access

  def _at_exit(self) -> None:
    self._stop.set()
    if not self.failed:
      self._set("done", "1")
      return
    if not self._leaving.acquire(blocking=False):
      threading.Event().wait()
    self._set("exiting", "1")
    self._leave(self.exit_status)  # the others stop on seeing the failure: none will come to jax's exit barrier


def _first_line(error: BaseException) -> str:
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return lines[0] if lines else repr(error)


def _flush() -> None:
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except Exception:  # pylint: disable=broad-except
      pass


def report_failure(error: BaseException) -> None:
  """Tell the other processes of a multi-process run that this one failed with `error` (they stop within about a
  second, naming it); this process then exits with status 1 (2 for a UsageError, as the CLIs) without waiting at
  jax's exit barrier. No-op on one process."""
  if PeerWatch._instance is not None:  # pylint: disable=protected-access
    PeerWatch._instance.report(error)  # pylint: disable=protected-access


def reporting_failures(fn: Callable[[], T]) -> Callable[[], T]:
  """`fn` that calls `report_failure` on any exception before re-raising it (the CLIs wrap their run with it)."""

  def wrapped() -> T:
    try:
      return fn()
    except (Exception, KeyboardInterrupt) as e:
      report_failure(e)
      raise

  return wrapped


def is_main_process() -> bool:
  """True on process 0, the one that writes the run's files."""
  return jax.process_index() == 0


_broadcasts = itertools.count()


def broadcast_from_main(arrays: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray] | None:
  """Process 0's `arrays` (a dict of numpy arrays, or None) on every process; what the others pass is ignored.

  Every process must call it at the same point. The keys, shapes and dtypes travel through the key-value store,
  the values through one collective (exact). On one process: `arrays` itself.
  """
  if jax.process_count() == 1:
    return None if arrays is None else dict(arrays)
  key = f"{_KV_PREFIX}broadcast/{next(_broadcasts)}"
  if is_main_process():
    arrays = None if arrays is None else {k: np.asarray(v) for k, v in arrays.items()}
    manifest = None if arrays is None else {k: [list(v.shape), v.dtype.str] for k, v in arrays.items()}
    _kv_client().key_value_set(key, json.dumps(manifest))
  else:
    manifest = json.loads(_kv_client().blocking_key_value_get(key, 3_600_000))
    arrays = None if manifest is None else {k: np.zeros(s, np.dtype(d)) for k, (s, d) in manifest.items()}
  if arrays is None:
    return None
  out = multihost_utils.broadcast_one_to_all(arrays, is_source=is_main_process())
  return {k: np.asarray(v) for k, v in out.items()}


# ------------------------------------------------------------------------------------ host <-> device placement


@functools.lru_cache(maxsize=64)
def _process_rows(mesh: Mesh, global_batch: int) -> tuple[int, int] | None:
  """(first, end) of the batch rows this process's devices hold under `batch_sharding(mesh)`, or None when they
  are not one contiguous block."""
  rows: set[int] = set()
  for index in batch_sharding(mesh).addressable_devices_indices_map((global_batch,)).values():
    rows.update(range(*index[0].indices(global_batch)))
  if not rows:
    return None
  lo, hi = min(rows), max(rows) + 1
  return (lo, hi) if len(rows) == hi - lo else None


def check_batch_split(mesh: Mesh, global_batch: int) -> None:
  """Raise ValueError unless `batch_sharding(mesh)` gives every process its own equal, contiguous share of a
  `global_batch`-row batch in process order (what per-host data, `host_local_batch_to_global`, assumes)."""
  n, i = jax.process_count(), jax.process_index()
  if n == 1:
    return
  per = global_batch // n
  held = _process_rows(mesh, global_batch)
  if global_batch % n == 0 and held == (i * per, (i + 1) * per):
    return
  where = f"rows {held[0]}..{held[1] - 1}" if held else "scattered rows"
  raise ValueError(
      f"the mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']} x tensor={mesh.shape['tensor']} does not "
      f"split the batch over the {n} processes: process {i}'s devices hold {where} of a {global_batch}-row batch, "
      f"not its own {global_batch // n}; per-host data needs mesh.data x mesh.fsdp a multiple of the process count "
      "with each process's devices on its own slice (e.g. mesh.data=-1, or tensor parallelism within a host only)"
  )


def host_local_batch_to_global(batch: Any, mesh: Mesh) -> Any:
  """Assemble each host's slice of a batch (pytree of [B_local, ...] arrays) into global arrays.

  The global batch is the concatenation of the process-local batches along dim 0, sharded with
  `batch_sharding(mesh)`; on one host this is a plain device_put. Raises ValueError (`check_batch_split`) when
  the mesh does not give each process exactly its own rows.
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
    check_batch_split(mesh, global_b)
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
  """Global arrays from a global numpy batch that every host holds: each host places the rows its own devices
  hold (any mesh, also one whose batch axes do not span the hosts)."""
  sharding = batch_sharding(mesh)
  dp = data_parallel_size(mesh)

  def one(path, x):
    x = np.asarray(x)
    if x.ndim == 0:
      raise ValueError(f"global_batch_to_devices: batch entry {jax.tree_util.keystr(path)} is a scalar")
    if x.shape[0] % dp:
      raise ValueError(
          f"global_batch_to_devices: batch entry {jax.tree_util.keystr(path)} has shape {x.shape}; the batch "
          f"{x.shape[0]} is not divisible by data x fsdp = {dp}"
      )
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree_util.tree_map_with_path(one, batch)


def mesh_from_config(mesh_config: Any, distributed_config: Any = None) -> Mesh:
  """`jax.distributed` initialised when the environment says so (timeouts of a config's `distributed` block),
  then `make_mesh(data, fsdp, tensor)` of a config's `mesh` block."""
  initialize_distributed_if_needed(distributed_config)
  return make_mesh(data=int(mesh_config.data), fsdp=int(mesh_config.fsdp), tensor=int(mesh_config.tensor))
