"""HF checkpoints <-> (Transformer, params, ModelConfig): safetensors, sharded files, placement on a mesh.

Loading reads each tensor through a read-only memory map of its safetensors file (any dtype, bf16 included,
without going through torch), converts it to our layout and places it straight onto its target sharding with
`jax.make_array_from_callback`, so each device only ever receives its own slice and the host never holds more
than one tensor. Saving streams tensors one at a time into (optionally sharded) safetensors files that
`transformers.AutoModelForCausalLM.from_pretrained` opens unchanged.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from displacement_jax.models import convert
from displacement_jax.models.config import ModelConfig
from displacement_jax.models.transformer import Transformer
from displacement_jax import rundir
from displacement_jax import sharding as sharding_lib

_ST_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_HUB_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
]
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

Path = tuple[str, ...]


def np_dtype(name: str) -> np.dtype:
  """numpy dtype for a name ('bfloat16' via ml_dtypes)."""
  if name == "bfloat16":
    import ml_dtypes  # pylint: disable=g-import-not-at-top

    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


# ---------------------------------------------------------------------------------------------- safetensors


def read_safetensors_header(file: str) -> tuple[dict[str, dict[str, Any]], int]:
  """(tensor name -> {'dtype', 'shape', 'data_offsets'}, byte offset of the data section) of a safetensors file."""
  try:
    with open(file, "rb") as f:
      raw = f.read(8)
      if len(raw) != 8:
        raise ValueError("file is shorter than the 8-byte header length")
      (n,) = struct.unpack("<Q", raw)
      if n > 100_000_000:
        raise ValueError(f"header length {n} is implausible")
      header = json.loads(f.read(n))
  except (OSError, ValueError, UnicodeDecodeError) as e:
    raise ValueError(f"{file}: not a readable safetensors file ({e})") from e
  header.pop("__metadata__", None)
  size = os.path.getsize(file)
  for name, info in header.items():
    if info.get("dtype") not in _ST_DTYPES:
      raise ValueError(f"{file}: tensor {name!r} has unsupported safetensors dtype {info.get('dtype')!r}")
    end = 8 + n + int(info.get("data_offsets", (0, 0))[1])
    if end > size:  # a file cut short (interrupted download or copy): name it before anything is mapped
      raise ValueError(
          f"{file}: tensor {name!r} ends at byte {end} but the file has only {size} bytes (truncated: an "
          "interrupted download or copy?)"
      )
  return header, 8 + n


def read_safetensors_tensor(file: str, info: Mapping[str, Any], data_start: int) -> np.ndarray:
  """A read-only memory-mapped numpy view of one tensor (no copy)."""
  dtype = np_dtype(_ST_DTYPES[info["dtype"]])
  shape = tuple(int(s) for s in info["shape"])
  begin, end = (int(o) for o in info["data_offsets"])
  if end - begin != math.prod(shape) * dtype.itemsize:
    raise ValueError(f"{file}: tensor byte range {begin}..{end} does not match shape {shape} dtype {dtype}")
  if not shape or math.prod(shape) == 0:
    return np.zeros(shape, dtype)
  size = os.path.getsize(file)
  if data_start + end > size:
    raise ValueError(
        f"{file}: a tensor at bytes {data_start + begin}..{data_start + end} lies past the end of the file "
        f"({size} bytes; truncated?)"
    )
  return np.memmap(file, dtype=dtype, mode="r", offset=data_start + begin, shape=shape)


def _write_safetensors(file: str, tensors: list[tuple[str, tuple[int, ...], np.dtype, Any]], fetch) -> None:
  """Stream tensors into `file`: (name, shape, dtype, handle) entries; `fetch(handle)` gives one numpy array."""
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
  offset = 0
  for name, shape, dtype, _ in tensors:
    nbytes = math.prod(shape) * dtype.itemsize
    header[name] = {"dtype": _ST_NAMES[dtype.name], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with rundir.atomic(file) as tmp, open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for name, shape, dtype, handle in tensors:
      arr = np.ascontiguousarray(fetch(handle), dtype=dtype)
      if arr.shape != shape:
        raise ValueError(f"tensor {name!r}: got shape {arr.shape} while writing, expected {shape}")
      f.write(arr.tobytes())


# ---------------------------------------------------------------------------------------------- loading


def resolve_checkpoint_dir(path_or_hub_id: str, *, revision: str | None = None) -> str:
  """A local directory holding the checkpoint: `path_or_hub_id` itself, or a hub snapshot (downloaded or cached)."""
  path = os.fspath(path_or_hub_id)
  if os.path.isdir(path):
    return path
  if os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") > 1:
    raise ValueError(f"from_pretrained: {path!r} is not a checkpoint directory")
  import huggingface_hub  # pylint: disable=g-import-not-at-top

  try:
    return huggingface_hub.snapshot_download(path, revision=revision, allow_patterns=_HUB_PATTERNS)
  except Exception as download_error:  # pylint: disable=broad-except
    try:
      return huggingface_hub.snapshot_download(
          path, revision=revision, allow_patterns=_HUB_PATTERNS, local_files_only=True
      )
    except Exception:  # pylint: disable=broad-except
      raise ValueError(
          f"from_pretrained: {path!r} is not a local directory and could not be fetched from the Hugging Face hub "
          f"(offline and not in the cache {huggingface_hub.constants.HF_HUB_CACHE!r}?): "
          f"{type(download_error).__name__}: {download_error}"
      ) from download_error


def read_hf_config(ckpt_dir: str) -> dict[str, Any]:
  """config.json of a checkpoint directory as a dict."""
  file = os.path.join(ckpt_dir, "config.json")
  if not os.path.isfile(file):
    raise ValueError(f"from_pretrained: {ckpt_dir!r} has no config.json")
  try:
    with open(file) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"from_pretrained: cannot parse {file}: {e}") from e


def checkpoint_files(ckpt_dir: str) -> dict[str, str]:
  """HF tensor name -> safetensors file path (from the index when sharded)."""
  index = os.path.join(ckpt_dir, INDEX_FILE)
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
      raise ValueError(f"{index}: no 'weight_map'")
    out = {name: os.path.join(ckpt_dir, shard) for name, shard in weight_map.items()}
    for file in sorted(set(out.values())):
      if not os.path.isfile(file):
        raise ValueError(f"{index} names shard {os.path.basename(file)!r}, which does not exist")
    return out
  single = os.path.join(ckpt_dir, SINGLE_FILE)
  if os.path.isfile(single):
    header, _ = read_safetensors_header(single)
    return {name: single for name in header}
  present = sorted(os.listdir(ckpt_dir))
  raise ValueError(
      f"{ckpt_dir!r} has neither {SINGLE_FILE} nor {INDEX_FILE} (files: {present}); only safetensors checkpoints are supported"
  )


def _expected_hf_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, ...]:
  return tuple(reversed(shape)) if path[-1] == "kernel" else shape


def plan_load(ckpt_dir: str, config: ModelConfig) -> dict[Path, tuple[str, str, dict[str, Any], int]]:
  """param path -> (HF name, file, header entry, data offset); checks names and shapes from headers alone.

  Raises ValueError naming unknown tensors, missing tensors, or tensors with an unexpected shape.
  """
  files = checkpoint_files(ckpt_dir)
  headers = {f: read_safetensors_header(f) for f in sorted(set(files.values()))}
  expected = convert.expected_layer_shapes(config)
  plan: dict[Path, tuple[str, str, dict[str, Any], int]] = {}
  unknown, bad_shape = [], []
  for name, file in files.items():
    header, start = headers[file]
    if name not in header:
      raise ValueError(f"{file}: the index lists tensor {name!r} but the file does not contain it")
    try:
      path = convert.hf_name_to_path(name, config)
    except ValueError:
      unknown.append(name)
      continue
    if path is None:
      continue
    got = tuple(int(s) for s in header[name]["shape"])
    want = _expected_hf_shape(path, expected[path])
    if got != want:
      bad_shape.append(f"{name!r}: expected shape {want}, got {got}")
    plan[path] = (name, file, header[name], start)
  if unknown:
    raise ValueError(
        f"{ckpt_dir!r}: {len(unknown)} unknown tensor name(s) for a {config.model_type} checkpoint with "
        f"num_layers={config.num_layers}: {', '.join(repr(n) for n in sorted(unknown)[:12])}"
    )
  if bad_shape:
    raise ValueError(f"{ckpt_dir!r}: tensor(s) with unexpected shape for config.json: {'; '.join(bad_shape[:12])}")
  missing = [convert.param_path_to_hf_name(p) for p in expected if p not in plan]
  if missing:
    raise ValueError(f"{ckpt_dir!r}: missing tensor(s) {', '.join(repr(n) for n in missing[:12])}")
  return plan


def place_param(array_hf: np.ndarray | Sequence[np.ndarray], path: Path, dtype: np.dtype, sharding: Any) -> jax.Array:
  """One param of the stacked tree in our layout, `dtype`, on `sharding` (or the default device).

  `array_hf` is one HF-layout tensor (e.g. a memmap), or for a layer param (`path` under `layers/`) the list of
  its per-layer tensors, stacked here on the leading axis. Each device reads only its own slice.
  """
  per_layer = isinstance(array_hf, (list, tuple))
  views = [a.T if path[-1] == "kernel" else a for a in (array_hf if per_layer else [array_hf])]  # views: no copies

  def read(idx: tuple[slice, ...]) -> np.ndarray:
    if not per_layer:
      return np.ascontiguousarray(views[0][idx], dtype=dtype)
    return np.ascontiguousarray(np.stack([views[i][idx[1:]] for i in range(*idx[0].indices(len(views)))]), dtype=dtype)

  shape = ((len(views),) if per_layer else ()) + tuple(views[0].shape)
  if sharding is None:
    return jax.device_put(read(tuple(slice(None) for _ in shape)))
  return jax.make_array_from_callback(shape, sharding, read)


def place_tensors(
    tensors_hf: Mapping[Path, Any], config: ModelConfig, mesh: Any = None, *, desc: str = "load", progress: bool = True
) -> dict[str, Any]:
  """The stacked param tree from {per-layer path: HF-layout tensor} (memmaps or arrays), each param placed on
  its `sharding.param_shardings` sharding when `mesh` is given (models/convert.py describes the two layouts)."""
  target = np_dtype(config.param_dtype)
  shardings = (
      convert.flatten_tree(sharding_lib.param_shardings(convert.expected_param_shapes(config), mesh))
      if mesh is not None
      else {}
  )
  grouped: dict[Path, dict[int | None, Any]] = {}
  for path, tensor in tensors_hf.items():
    stacked, layer = convert.stacked_path(path)
    grouped.setdefault(stacked, {})[layer] = tensor
  params: dict[str, Any] = {}
  for stacked, layers in tqdm(
      sorted(grouped.items()), desc=desc, disable=not progress, dynamic_ncols=True, leave=False
  ):
    tensors = layers[None] if None in layers else [layers[i] for i in range(config.num_layers)]
    convert.set_in_tree(params, stacked, place_param(tensors, stacked, target, shardings.get(stacked)))
  return params


def from_pretrained(
    path_or_hub_id: str,
    *,
    dtype: str = "float32",
    param_dtype: str | None = None,
    mesh: Any = None,
    remat: bool = False,
    revision: str | None = None,
    progress: bool = True,
) -> tuple[Transformer, dict[str, Any], ModelConfig]:
  """Load an HF safetensors checkpoint (local dir, or hub id through snapshot_download) as (model, params, config).

  `dtype` is the compute dtype, `param_dtype` the storage dtype (default: `dtype`). With `mesh`, every param is
  placed directly on its `sharding.param_shardings` sharding.
  """
  ckpt_dir = resolve_checkpoint_dir(path_or_hub_id, revision=revision)
  hf_config = read_hf_config(ckpt_dir)
  config = ModelConfig.from_hf(hf_config, dtype=dtype, param_dtype=param_dtype or dtype, remat=remat)
  plan = plan_load(ckpt_dir, config)
  tensors = {path: read_safetensors_tensor(file, info, start) for path, (_, file, info, start) in plan.items()}
  params = place_tensors(
      tensors, config, mesh, desc=f"load {os.path.basename(os.path.normpath(ckpt_dir))}", progress=progress
  )
  return Transformer(config), params, config


# ---------------------------------------------------------------------------------------------- saving


def _host_array(x: Any) -> np.ndarray:
  """A full numpy copy of one param (all-gathered across processes when not fully addressable)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def save_pretrained(
    params: Mapping[str, Any],
    config: ModelConfig,
    out_dir: str,
    *,
    max_shard_bytes: float = 5e9,
    dtype: str | None = None,
    progress: bool = True,
) -> str:
  """Write config.json + safetensors (sharded with an index above `max_shard_bytes`) readable by transformers.

  `dtype` is the stored dtype (default: config.param_dtype). Tensors are fetched and written one at a time;
  on several processes all take part in gathers and process 0 writes. Returns `out_dir`.
  """
  p = params["params"] if "params" in params and "embed_tokens" not in params else params
  flat = convert.flatten_tree(p)
  expected = _checked_shapes(flat, config)
  store = np_dtype(dtype or config.param_dtype)
  if store.name not in _ST_NAMES:
    raise ValueError(f"save_pretrained: unsupported dtype {dtype!r}")
  if max_shard_bytes <= 0:
    raise ValueError(f"save_pretrained: max_shard_bytes must be positive, got {max_shard_bytes}")
  entries, shards = _plan_shards(expected, config, store, max_shard_bytes)

  writer = jax.process_index() == 0
  if writer:
    os.makedirs(out_dir, exist_ok=True)
    for stale in os.listdir(out_dir):  # an old sharding would shadow the new files
      if stale == INDEX_FILE or (stale.startswith("model") and stale.endswith(".safetensors")):
        os.remove(os.path.join(out_dir, stale))
  bar = tqdm(total=len(entries), desc="save", disable=not progress or not writer, dynamic_ncols=True, leave=False)

  held: dict[str, Any] = {}  # the host copy of the one stacked param being written

  def fetch(handle: tuple[Path, int | None]) -> np.ndarray:
    stacked, layer = handle
    if held.get("path") != stacked:
      held.update(path=stacked, array=_host_array(flat[stacked]))
    arr = held["array"] if layer is None else held["array"][layer]
    bar.update(1)
    return arr.T if stacked[-1] == "kernel" else arr

  names = (
      [SINGLE_FILE]
      if len(shards) == 1
      else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  )
  for shard_name, shard in zip(names, shards):
    if writer:
      _write_safetensors(os.path.join(out_dir, shard_name), shard, fetch)
    else:
      for *_, handle in shard:
        fetch(handle)
  bar.close()
  if writer:
    _write_index_and_config(out_dir, config, store, entries, shards, names)
  return out_dir


def _checked_shapes(flat: Mapping[Path, Any], config: ModelConfig) -> dict[Path, tuple[int, ...]]:
  """{path: shape} of `config`'s param tree, in model order, once `flat` (the params, flattened) matches it:
  no unknown or missing entry and every shape as expected (ValueError naming the first ones otherwise)."""
  expected = convert.flatten_tree(convert.expected_param_shapes(config))
  unknown = sorted("/".join(k) for k in flat if k not in expected)
  if unknown:
    raise ValueError(f"save_pretrained: params has entries not in a {config.model_type} param tree: {unknown[:12]}")
  missing = sorted("/".join(k) for k in expected if k not in flat)
  if missing:
    raise ValueError(f"save_pretrained: params is missing {missing[:12]}")
  for k, v in flat.items():
    if tuple(np.shape(v)) != expected[k]:
      raise ValueError(
          f"save_pretrained: param {'/'.join(k)} has shape {tuple(np.shape(v))}, expected {expected[k]} from config"
      )
  return expected


def _plan_shards(
    expected: Mapping[Path, tuple[int, ...]], config: ModelConfig, store: np.dtype, max_shard_bytes: float
) -> tuple[list[Any], list[list[Any]]]:
  """(entries, shards): one (HF name, HF shape, dtype, (stacked path, layer)) entry per HF tensor in model order
  (embed, layers: one param over all layers at a time, norm, lm_head), cut into shards of at most
  `max_shard_bytes` (a tensor larger than that gets a shard of its own)."""
  entries = []
  layer_shapes = convert.expected_layer_shapes(config)
  for stacked in expected:
    for layer in [None] if stacked[0] != convert.LAYERS else range(config.num_layers):
      path = convert.layer_path(stacked, layer)
      entries.append(
          (convert.param_path_to_hf_name(path), _expected_hf_shape(path, layer_shapes[path]), store, (stacked, layer))
      )
  shards: list[list[Any]] = [[]]
  size = 0
  for e in entries:
    nbytes = math.prod(e[1]) * store.itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(e)
    size += nbytes
  return entries, shards


def _write_index_and_config(
    out_dir: str,
    config: ModelConfig,
    store: np.dtype,
    entries: Sequence[Any],
    shards: Sequence[Sequence[Any]],
    names: Sequence[str],
) -> None:
  """The shard index (when there are several shards) and config.json (with the stored dtype), atomically."""
  if len(shards) > 1:
    index = {
        "metadata": {"total_size": sum(math.prod(e[1]) * store.itemsize for e in entries)},
        "weight_map": {e[0]: n for n, shard in zip(names, shards) for e in shard},
    }
    rundir.write_json(os.path.join(out_dir, INDEX_FILE), index, indent=2)
  hf = config.to_hf()
  hf["torch_dtype"] = store.name
  hf["dtype"] = store.name
  rundir.write_json(os.path.join(out_dir, "config.json"), hf, indent=2)


def iter_checkpoint_tensors(ckpt_dir: str) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, memory-mapped numpy array) for every tensor of a safetensors checkpoint directory."""
  for name, file in sorted(checkpoint_files(ckpt_dir).items()):
    header, start = read_safetensors_header(file)
    yield name, read_safetensors_tensor(file, header[name], start)
