"""Parameter subspaces and unbiased random projections of parameter-shaped vectors, blockwise per leaf.

The audit's decomposition (audit/decompose.py) takes inner products of per-pair gradients restricted to a
SUBSPACE of the parameters and compressed to k numbers by a random projection S with E[<S a, S b>] = <a, b>:

  subspace  'all'                    every parameter
            'head_and_last_layers'   the LM head (the tied embedding when there is no separate head), the final
                                     norm and the last `last_layers` layers of the stacked decoder ('layers', the
                                     layer axis first)
  sketch    'none'                   no projection: the flattened vector itself (exact; small models only)
            'rademacher'             S = [R_1 ... R_L], R_l [k, d_l] i.i.d. +-1/sqrt(k): E[S^T S] = I
            'count_sketch'           coordinate c of leaf l goes to bucket h_l(c) in [0, k) with sign s_l(c) = +-1
                                     (S has one +-1 per column): E[S^T S] = I, cost O(d) per vector

Both projections are applied leaf by leaf and block by block, their randomness regenerated from (seed, leaf, block)
on every call, so no [d, k] matrix is ever held: Rademacher's memory is one [block, k] tile (about
`TILE_ELEMENTS` numbers), count-sketch's one uint32 draw per coordinate (`count_sketch_bits`: bit 0 the sign, the
rest modulo k the bucket; uniform when k is a power of 2, slightly uneven otherwise, unbiased either way since
that rests on the signs), which a caller projecting many vectors computes once and passes in. For unit vectors
a, b both have Var <S a, S b> = (|a|^2 |b|^2 + <a, b>^2 - 2 sum_c a_c^2 b_c^2) / k, so the error falls as 1 / sqrt(k)
(tests/test_audit.py measures it).

Count-sketch hashes the LM head's matrix (`OUTER_LEAVES`: the embedding, the untied head) by row and column
instead: one draw per row r and per column c, coordinate (r, c) in bucket (h(r) + h(c)) mod k with sign
s(r) s(c) (TensorSketch's hash, Pham & Pagh 2013). Any two coordinates still collide with probability 1/k and the
signs make every inner product unbiased; the signs are products, so the variance gains terms from rectangles of
coordinates (still O(1/k); tests/test_audit.py measures it). What it buys: the sketch of a sum of outer products
sum_n u_n v_n^T (a per-pair gradient of the head: hidden states times the log-softmax's cotangents) is computed
from the factors (`outer_project`) without forming the [V, D] matrix (audit/factored.py), equal to projecting the
matrix itself (`project`).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp

SUBSPACES = ("all", "head_and_last_layers")
OUTER_LEAVES = ("embed_tokens/embedding", "lm_head/kernel")  # count-sketch hashes these by row and column
SKETCHES = ("none", "rademacher", "count_sketch")
TILE_ELEMENTS = 1 << 22  # Rademacher: the largest [block, k] tile of signs generated at once (16 MiB of float32)


def leaf_name(path: tuple[Any, ...]) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def select(tree: Any, subspace: str, last_layers: int = 1) -> dict[str, jax.Array]:
  """{leaf name: float32 leaf restricted to `subspace`} of a params-shaped tree (module docstring), in a fixed
  order; works on params, gradients and preconditioners alike, under jit."""
  if subspace not in SUBSPACES:
    raise ValueError(f"audit.subspace must be one of {SUBSPACES}, got {subspace!r}")
  flat = [(leaf_name(path), x) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]]
  if subspace == "all":
    return {name: x.astype(jnp.float32) for name, x in flat}
  if last_layers < 0:
    raise ValueError(f"audit.last_layers must be >= 0, got {last_layers}")
  tops = {name.split("/")[0] for name, _ in flat}
  head = "lm_head" if "lm_head" in tops else "embed_tokens"  # tied embeddings: the embedding is the head
  out = {}
  for name, x in flat:
    top = name.split("/")[0]
    if top == "layers" and last_layers > 0:
      out[name] = x[x.shape[0] - min(last_layers, x.shape[0]) :].astype(jnp.float32)
    elif top in (head, "norm"):
      out[name] = x.astype(jnp.float32)
  if not out:
    raise ValueError(f"audit.subspace {subspace!r} selects no parameter of a tree with {sorted(tops)}")
  return out


def restrict(tree: Any, subspace: str, last_layers: int = 1) -> Any:
  """`tree` (params-shaped) with zeros outside `subspace` (`select`'s coordinates kept): a direction restricted to
  the subspace, so that <grad, restrict(D)> is the inner product `select` and `project` estimate."""
  if subspace == "all":
    return tree
  kept = select(tree, subspace, last_layers)

  def one(path, x):
    name = leaf_name(path)
    if name not in kept:
      return jnp.zeros_like(x)
    if name.split("/")[0] == "layers":
      keep = x.shape[0] - min(last_layers, x.shape[0])
      return x.at[:keep].set(0)
    return x

  return jax.tree_util.tree_map_with_path(one, tree)


def size(leaves: dict[str, Any]) -> int:
  """Number of coordinates of a selected subspace."""
  return sum(int(math.prod(x.shape)) for x in leaves.values())


def is_outer(name: str, shape: Sequence[int]) -> bool:
  """Whether count-sketch hashes leaf `name` of `shape` by row and column (module docstring)."""
  return name in OUTER_LEAVES and len(shape) == 2


def count_sketch_bits(leaves: dict[str, Any], seed: int = 0) -> dict[str, Any]:
  """{leaf name: uint32 [d_l]}: count-sketch's random draw per coordinate (bit 0 its sign, the rest its bucket),
  or for an `is_outer` leaf of shape [m, n] a pair (uint32 [m] per row, uint32 [n] per column); the draw `project`
  makes, computed once and passed to `project` (`bits`) it is not regenerated per call. Under jit, or drawn in one
  compiled call for all leaves."""
  spec = tuple((name, tuple(int(n) for n in leaves[name].shape)) for name in sorted(leaves))
  if isinstance(seed, jax.core.Tracer):
    return _draw_bits(seed, spec)
  return _draw_bits_jit(seed, spec)


def _draw_bits(seed: Any, spec: tuple[tuple[str, tuple[int, ...]], ...]) -> dict[str, Any]:
  root = jax.random.key(seed)
  out = {}
  for i, (name, shape) in enumerate(spec):
    key = jax.random.fold_in(root, i)
    if is_outer(name, shape):
      rows, cols = jax.random.split(key)
      out[name] = (jax.random.bits(rows, shape[:1], jnp.uint32), jax.random.bits(cols, shape[1:], jnp.uint32))
    else:
      out[name] = jax.random.bits(key, (int(math.prod(shape)),), jnp.uint32)
  return out


_draw_bits_jit = jax.jit(_draw_bits, static_argnums=1)


def _sign_bucket(bits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  return 1.0 - 2.0 * (bits & 1).astype(jnp.float32), ((bits >> 1) % jnp.uint32(k)).astype(jnp.int32)


def _count_sketch_leaf(x_D: jax.Array, bits_D: jax.Array, k: int) -> jax.Array:
  sign_D, bucket_D = _sign_bucket(bits_D, k)
  return jax.ops.segment_sum(sign_D * x_D, bucket_D, num_segments=k)


def _fold(z_NK: jax.Array, bits_N: jax.Array, k: int) -> jax.Array:
  """sum_n s(n) z_n shifted cyclically by h(n): the outer hash's second index applied to per-index sketches of
  the first ([N, k] -> [k]); a gather of each row rolled, then a sum."""
  sign_N, shift_N = _sign_bucket(bits_N, k)
  source_NK = (jnp.arange(k, dtype=jnp.int32)[None, :] - shift_N[:, None]) % k
  rolled_NK = jnp.take_along_axis(z_NK.astype(jnp.float32), source_NK, axis=1)
  return jnp.einsum("nk,n->k", rolled_NK, sign_N)


def _outer_leaf(x_MN: jax.Array, bits: tuple[jax.Array, jax.Array], k: int) -> jax.Array:
  """Count-sketch of a matrix under the outer hash: its longer axis bucketed (a segment sum of whole rows or
  columns), then the other folded."""
  x_MN = x_MN.astype(jnp.float32)
  if x_MN.shape[0] < x_MN.shape[1]:  # bucket the columns: the same hash, transposed
    return _outer_leaf(x_MN.T, bits[::-1], k)
  sign_M, bucket_M = _sign_bucket(bits[0], k)
  z_KN = jax.ops.segment_sum(x_MN * sign_M[:, None], bucket_M, num_segments=k)
  return _fold(z_KN.T, bits[1], k)


def outer_project(
    rows_PM: jax.Array,
    cols_PN: jax.Array,
    bits: tuple[jax.Array, jax.Array],
    k: int,
    lookup: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array:
  """Count-sketch [k] of the [M, N] matrix sum_p rows_p cols_p^T (+ sum_t onehot_M(ids_t) vals_t^T for `lookup` =
  (ids [T], vals [T, N]): an embedding's lookup gradient) under the outer hash `bits` (`count_sketch_bits` of an
  `is_outer` leaf) without forming it: under that hash the sketch of an outer product u v^T is the circular
  convolution of u's and v's own count-sketches, summed over p through the FFT (O(P k log k)); the lookup rows are
  one-hot, their convolution a signed shift. Equals `project` of the matrix (tests/test_audit.py)."""
  if rows_PM.shape[1] < cols_PN.shape[1]:
    if lookup is not None:
      raise ValueError("outer_project: `lookup` indexes the longer (row) side")
    return outer_project(cols_PN, rows_PM, bits[::-1], k)
  each = lambda x_PD, b: jax.vmap(lambda x: _count_sketch_leaf(x, b, k))(x_PD.astype(jnp.float32))
  spectrum_F = jnp.sum(jnp.fft.rfft(each(rows_PM, bits[0])) * jnp.fft.rfft(each(cols_PN, bits[1])), axis=0)
  out_K = jnp.fft.irfft(spectrum_F, n=k).astype(jnp.float32)
  if lookup is not None:
    ids_T, vals_TN = lookup
    out_K = out_K + _fold(each(vals_TN, bits[1]), bits[0][ids_T], k)
  return out_K


def _rademacher_leaf(x_D: jax.Array, key: jax.Array, k: int) -> jax.Array:
  d = x_D.shape[0]
  block = max(1, min(d, TILE_ELEMENTS // k))
  blocks = -(-d // block)
  x_NC = jnp.pad(x_D, (0, blocks * block - d)).reshape(blocks, block)

  def body(acc_K, i):
    tile_CK = jax.random.rademacher(jax.random.fold_in(key, i), (block, k), jnp.float32)
    return acc_K + x_NC[i] @ tile_CK, None

  acc_K, _ = jax.lax.scan(body, jnp.zeros((k,), jnp.float32), jnp.arange(blocks))
  return acc_K / math.sqrt(k)


def project(
    leaves: dict[str, jax.Array], sketch: str, k: int, seed: int = 0, bits: dict[str, jax.Array] | None = None
) -> jax.Array:
  """S v for one vector given as selected leaves (`select`): [k] float32 (sketch 'none': [d], the leaves
  flattened). The same (sketch, k, seed) and leaf shapes give the same S on every call: inner products of two
  projected vectors estimate theirs without bias. `bits`: count-sketch's draw (`count_sketch_bits` of the same
  leaves and seed), else drawn here."""
  if sketch not in SKETCHES:
    raise ValueError(f"audit.sketch must be one of {SKETCHES}, got {sketch!r}")
  flat = [leaves[name].reshape(-1).astype(jnp.float32) for name in sorted(leaves)]
  if sketch == "none":
    return jnp.concatenate(flat)
  if k < 1:
    raise ValueError(f"audit.sketch_dim must be >= 1, got {k}")
  if sketch == "count_sketch":
    bits = count_sketch_bits(leaves, seed) if bits is None else bits
    return sum(
        _outer_leaf(leaves[name], bits[name], k)
        if is_outer(name, leaves[name].shape)
        else _count_sketch_leaf(x_D, bits[name], k)
        for name, x_D in zip(sorted(leaves), flat)
    )
  root = jax.random.key(seed)
  return sum(_rademacher_leaf(x_D, jax.random.fold_in(root, i), k) for i, x_D in enumerate(flat))


def project_rows(
    leaves: dict[str, jax.Array], sketch: str, k: int, seed: int = 0, bits: dict[str, jax.Array] | None = None
) -> jax.Array:
  """`project` of n vectors stacked on the leaves' leading axis: [n, k] (jax.vmap; the projection's randomness
  does not depend on the vectors, so it is drawn once for all n)."""
  return jax.vmap(lambda one: project(one, sketch, k, seed, bits))(leaves)
