"""LoRA adapters as PEFT defines them: params, the adapter term of a linear layer, and the merge.

A LoRA linear computes `y = x W + b + dropout(x) A B * scaling` (peft.tuners.lora.layer.Linear.forward) with
`scaling = alpha / r` (or `alpha / sqrt(r)`, rsLoRA), the adapter term in the adapters' dtype (fp32) from the input
cast to it, the sum cast back to the layer's output dtype. Init as PEFT's `init_lora_weights=True`: A
kaiming-uniform(a=sqrt(5)) (uniform on +-1/sqrt(in)), B zeros, so a fresh adapter leaves the model unchanged.

Layout: an adapter lives beside the kernel it adapts, stacked on the layer axis like every layer param:
`layers/self_attn/q_proj/lora_A [L, in, r]`, `lora_B [L, r, out]` (PEFT's `lora_A.weight [r, in]`,
`lora_B.weight [out, r]` transposed, see models/peft_io.py). `Transformer` applies an adapter wherever its params
hold one, so the base params alone are the base model (the reference policy needs no second copy): `combine`
and `split` move between the base tree, the adapter tree and the tree the model takes.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from displacement_jax.models.config import ModelConfig

Array = jax.Array

MODULE_OF = {  # PEFT's target-module names (HF's nn.Linear names) -> the module holding them in a decoder layer
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
ALL_LINEAR = ("all-linear", "all")  # PEFT's 'all-linear' (every Linear but the LM head), LlamaFactory's 'all'
ADAPTER_LEAVES = ("lora_A", "lora_B")


def target_modules(targets: str | Sequence[str]) -> tuple[str, ...]:
  """The adapted projections, in model order, of PEFT-style `targets`: 'all-linear' (or 'all'), a comma-separated
  string, or a list of names from MODULE_OF. ValueError names an unknown one."""
  if isinstance(targets, str):
    if targets.strip() in ALL_LINEAR:
      return tuple(MODULE_OF)
    targets = [t for t in targets.split(",")]
  names = [str(t).strip() for t in targets]
  unknown = [t for t in names if t not in MODULE_OF]
  if unknown or not names:
    raise ValueError(
        f"lora target_modules {unknown or names!r}: expected 'all-linear' or names from {', '.join(MODULE_OF)}"
    )
  return tuple(t for t in MODULE_OF if t in names)


def scaling(alpha: float, rank: int, rslora: bool = False) -> float:
  """PEFT's scaling of the adapter term: alpha / r, or alpha / sqrt(r) with rsLoRA."""
  return float(alpha) / (math.sqrt(rank) if rslora else rank)


def with_lora(config: ModelConfig, alpha: float, dropout: float = 0.0, rslora: bool = False) -> ModelConfig:
  """`config` with the LoRA settings the model applies to adapters it finds in the params."""
  if not alpha > 0:
    raise ValueError(f"lora alpha must be > 0, got {alpha}")
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"lora dropout must lie in [0, 1), got {dropout}")
  return config.replace(lora_alpha=float(alpha), lora_dropout=float(dropout), lora_rslora=bool(rslora))


def adapter_term(x: Array, a_IR: Array, b_RO: Array, config: ModelConfig, rng: Array | None) -> Array:
  """dropout(x) A B * scaling in the adapters' dtype (x cast to it), as PEFT's Linear computes it; `rng` None: no
  dropout (PEFT's eval mode)."""
  if not config.lora_alpha > 0:
    raise ValueError("the params hold LoRA adapters but the model config has no lora_alpha (models.lora.with_lora)")
  x = x.astype(a_IR.dtype)
  if rng is not None and config.lora_dropout > 0:
    keep = 1.0 - config.lora_dropout
    x = jnp.where(jax.random.bernoulli(rng, keep, x.shape), x / keep, 0.0).astype(x.dtype)
  return (x @ a_IR) @ b_RO * jnp.asarray(scaling(config.lora_alpha, a_IR.shape[-1], config.lora_rslora), x.dtype)


class WithDropout:
  """`model` whose `apply` passes a 'dropout' rng, so its adapters drop their inputs (PEFT's train mode)."""

  def __init__(self, model: Any, key: Array):
    self.model, self.key, self.config = model, key, model.config

  def apply(self, variables: Any, *args: Any, **kwargs: Any) -> Any:
    return self.model.apply(variables, *args, rngs={"dropout": self.key}, **kwargs)


def adapter_paths(targets: Sequence[str]) -> list[tuple[str, ...]]:
  """Paths in the stacked param tree of the adapted modules (`('layers', 'self_attn', 'q_proj')`, ...)."""
  return [("layers", MODULE_OF[t], t) for t in target_modules(targets)]


def init_adapters(
    params: Mapping[str, Any], rank: int, targets: str | Sequence[str], rng: Array, dtype: Any = jnp.float32
) -> dict[str, Any]:
  """Fresh adapters for the kernels of `params` (a stacked base tree, arrays or ShapeDtypeStructs) at the
  `targets` modules: A uniform on +-1/sqrt(in) (PEFT's kaiming_uniform_(a=sqrt(5))), B zeros, in `dtype`."""
  if int(rank) < 1:
    raise ValueError(f"lora rank must be >= 1, got {rank}")
  paths = adapter_paths(targets)
  out: dict[str, Any] = {}
  for path, key in zip(paths, jax.random.split(rng, len(paths))):
    num_layers, n_in, n_out = _node(params, path)["kernel"].shape
    bound = 1.0 / math.sqrt(n_in)
    a = jax.random.uniform(key, (num_layers, n_in, rank), jnp.float32, -bound, bound).astype(dtype)
    _set(out, path, {"lora_A": a, "lora_B": jnp.zeros((num_layers, rank, n_out), dtype)})
  return out


def combine(base: Mapping[str, Any], adapters: Mapping[str, Any]) -> dict[str, Any]:
  """The param tree the model takes: `base` with the adapter leaves added beside their kernels (no copies)."""
  out = dict(base)
  for k, v in adapters.items():
    if isinstance(v, Mapping):
      if not isinstance(out.get(k), Mapping):
        raise ValueError(f"adapter entry {k!r} has no module in the base params")
      out[k] = combine(out[k], v)
    else:
      out[k] = v
  return out


def full_params(base: Mapping[str, Any] | None, params: Mapping[str, Any]) -> Mapping[str, Any]:
  """The param tree the model takes from the TRAINED params: `params` itself without a base (full fine-tuning),
  `combine(base, params)` with one (LoRA: `params` the adapters). Differentiating through it w.r.t. `params`
  differentiates w.r.t. the adapters alone, the base a constant."""
  return params if base is None else combine(base, params)


def split(params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """(base, adapters) of a combined tree (the inverse of `combine`)."""
  base: dict[str, Any] = {}
  adapters: dict[str, Any] = {}
  for k, v in params.items():
    if isinstance(v, Mapping):
      b, a = split(v)
      base[k] = b
      if a:
        adapters[k] = a
    elif k in ADAPTER_LEAVES:
      adapters[k] = v
    else:
      base[k] = v
  return base, adapters


def adapter_nodes(adapters: Mapping[str, Any]) -> dict[tuple[str, ...], dict[str, Any]]:
  """{module path: {'lora_A', 'lora_B'}} of an adapter tree, in model order."""
  out = {}
  for target, module in MODULE_OF.items():
    path = ("layers", module, target)
    node = _node(adapters, path, missing_ok=True)
    if node is not None:
      if set(node) != set(ADAPTER_LEAVES):
        raise ValueError(f"adapter {'/'.join(path)} holds {sorted(node)}, expected {list(ADAPTER_LEAVES)}")
      out[path] = node
  extra = set(_leaf_paths(adapters)) - {p + (leaf,) for p in out for leaf in ADAPTER_LEAVES}
  if extra:
    raise ValueError(f"adapter tree holds entries that are no adapter: {sorted('/'.join(p) for p in extra)[:8]}")
  return out


def merge(base: Mapping[str, Any], adapters: Mapping[str, Any], config: ModelConfig) -> dict[str, Any]:
  """`base` with every adapted kernel replaced by kernel + scaling * A B (float32 product, cast to the kernel's
  dtype): the model PEFT's `merge_and_unload` gives (numpy in, numpy out)."""
  out = {k: v for k, v in base.items()}
  for path, node in adapter_nodes(adapters).items():
    module = dict(_node(out, path))
    kernel = np.asarray(module["kernel"])
    a, b = np.asarray(node["lora_A"], np.float32), np.asarray(node["lora_B"], np.float32)
    s = np.float32(scaling(config.lora_alpha, a.shape[-1], config.lora_rslora))
    module["kernel"] = (kernel.astype(np.float32) + np.matmul(a, b) * s).astype(kernel.dtype)
    _set(out, path, module, copy_parents=True)
  return out


def count(adapters: Mapping[str, Any]) -> int:
  """Number of adapter parameters."""
  return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(adapters)))


def _node(tree: Mapping[str, Any], path: Sequence[str], missing_ok: bool = False) -> Any:
  for k in path:
    if not isinstance(tree, Mapping) or k not in tree:
      if missing_ok:
        return None
      raise ValueError(f"the params have no module {'/'.join(path)}")
    tree = tree[k]
  return tree


def _set(tree: dict[str, Any], path: Sequence[str], value: Any, copy_parents: bool = False) -> None:
  for k in path[:-1]:
    tree[k] = dict(tree.get(k, {})) if copy_parents else tree.setdefault(k, {})
    tree = tree[k]
  tree[path[-1]] = value


def _leaf_paths(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
  out = []
  for k, v in tree.items():
    out.extend(_leaf_paths(v, prefix + (k,)) if isinstance(v, Mapping) else [prefix + (k,)])
  return out
