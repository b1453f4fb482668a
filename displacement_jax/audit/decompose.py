"""Displacement audit, decomposition: which pairs push pair i's ln pi(y+) down, to first order (the kernels).

The replay (audit/replay.py) sums the run's updates, each taken at theta0, into D. Each update is linear in the
batch's per-pair loss gradients once the optimizer's diagonal preconditioners are read from the replayed state:

  g_s = (gamma_s / B) sum_{j in batch s} g_j,   g_j = dl_j/ds_w a_j + dl_j/ds_l b_j
  delta_t = -sum_{s <= t} lr_t kappa(t, s) q_{tau} * g_s          (* elementwise)

with a_j = grad ln pi(y+_j), b_j = grad ln pi(y-_j) at theta0, l_j the pair's loss (its reference log-probs are
the start's), B the batch size, gamma_s the clip factor min(1, clip / |g_s|) (1 without clipping), lr_t the
schedule's rate, and per optimizer (q and kappa from `preconditioner` / `step_weights`):

  sgd       q = 1                                     lr_t kappa = lr_t mu^{t-s}     (mu: momentum, 0 by default)
  rmsprop   q_s = 1 / (sqrt(v_s) + eps)               lr_t kappa = lr_s mu^{t-s}     (optax applies the rate before
            (torch: v_s = a v_{s-1} + (1 - a) g_s^2)                                 its momentum trace), tau = s
  adamw     q_t = 1 / (sqrt(v_t / (1 - b2^t)) + eps)  lr_t kappa = lr_t (1 - b1) b1^{t-s} / (1 - b1^t), tau = t

So D = -sum_j W_j * g_j exactly (AdamW's weight decay -lr wd theta0 excepted: no pair owns it), with
W_j = sum_{s: j in batch s} (gamma_s / B) M_s and M_s = sum_{t >= s} lr_t kappa(t, s) q_tau. The contribution of
pair j to pair i's first-order change is C_ij = <a_i, -W_j * g_j>; its sum over j is the replay's first order.
What is approximated: nothing in that sum; the ATTRIBUTION holds each step's preconditioner fixed (q_s depends on
every pair of the batch through v_s, and is shared by them in proportion to their gradients), and everything
inherits the replay's gradients at theta0. Own term C_ii, others sum_{j != i} C_ij, top contributors the most
negative C_ij (j != i). Inner products are taken on a parameter subspace through an unbiased projection
(audit/sketch.py): memory O(N k) for the per-pair vectors, plus the per-step preconditioners on the subspace
(T x |subspace| float32 on the host; none for SGD).

Cost: the per-pair gradients are taken step by step, `audit.pair_chunk` pairs of the step's batch at a time in one
vectorised call (`make_chunk_sketches`: jax.vmap of the per-pair vjp over rows of one pair each, the projection
inside the call, count-sketch's hash drawn once per run), and S(W_j * g_j) = sum over the steps s holding j of
(gamma_s / B) S(M_s * g_j) is accumulated (experiments/short_runs.Session._pair_sketches; `pair_weight` writes
W_j out): as many per-pair backwards as the run has pair gradients (one epoch: one per pair, for y+ and for
y-), batched as training batches them. Only one chunk's per-pair gradients exist at a time (P x 3 x |subspace|
float32). On 'head_and_last_layers' the backward stops below the subspace (audit/truncated.py: the layers under it
run forward with fixed weights, so their weight gradients are never formed) and, with count-sketch on packed rows,
the head's per-side gradients are sketched from their factors (audit/factored.py); on 'all' it is the whole
model's.

LoRA runs (`base` given: theta the adapters on the fixed base params, `lora.full_params`): a_j, b_j, g_j, D, W_j
and the preconditioners are all adapter-shaped (the trained parameters); 'all' is every LoRA factor,
'head_and_last_layers' the adapters of the last layers (`sketch.select` on the adapter tree: no adapter on the
head or the norm), both through the whole model's backward.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from displacement_jax import forward, gradients
from displacement_jax.data import packing
from displacement_jax.models import lora
from displacement_jax.train import step as step_lib
from displacement_jax.audit import factored, sketch, truncated

DEFAULTS = {  # config.audit (configs/base.py)
    "decompose": True,
    "subspace": "all",
    "last_layers": 2,
    "sketch": "count_sketch",
    "sketch_dim": 4096,
    "sketch_seed": 0,
    "top_contributors": 5,
    "pair_chunk": 8,
}


@dataclasses.dataclass(frozen=True)
class Settings:
  subspace: str
  last_layers: int
  sketch: str
  sketch_dim: int
  sketch_seed: int
  top_contributors: int
  pair_chunk: int


def settings(config: ml_collections.ConfigDict) -> Settings:
  """The decomposition's settings from config.audit (defaults: `DEFAULTS`), checked."""
  audit = {**DEFAULTS, **dict(config.get("audit", {}) or {})}
  s = Settings(
      str(audit["subspace"]),
      int(audit["last_layers"]),
      str(audit["sketch"]),
      int(audit["sketch_dim"]),
      int(audit["sketch_seed"]),
      int(audit["top_contributors"]),
      int(audit["pair_chunk"]),
  )
  if s.subspace not in sketch.SUBSPACES:
    raise ValueError(f"config.audit.subspace must be one of {sketch.SUBSPACES}, got {s.subspace!r}")
  if s.sketch not in sketch.SKETCHES:
    raise ValueError(f"config.audit.sketch must be one of {sketch.SKETCHES}, got {s.sketch!r}")
  if s.sketch != "none" and s.sketch_dim < 1:
    raise ValueError(f"config.audit.sketch_dim must be >= 1, got {s.sketch_dim}")
  if s.pair_chunk < 1:
    raise ValueError(f"config.audit.pair_chunk must be >= 1, got {s.pair_chunk}")
  if s.last_layers < 0 or s.top_contributors < 0:
    raise ValueError("config.audit.last_layers and config.audit.top_contributors must be >= 0")
  return s


def preconditioner(optim_config: Any, opt_state: Any, t: jax.Array) -> Any:
  """q_t (module docstring) from the optimizer state after step t (1-based), a params-shaped tree; None for SGD."""
  name = optim_config.name
  if name == "sgd":
    return None
  nu = optax.tree_utils.tree_get(opt_state, "nu")
  eps = float(optim_config.get("eps", 1e-8))
  if name == "rmsprop":
    return jax.tree.map(lambda v: 1.0 / (jnp.sqrt(v.astype(jnp.float32)) + eps), nu)
  b2 = float(optim_config.get("b2", 0.999))
  correction = 1.0 - b2 ** t.astype(jnp.float32)
  return jax.tree.map(lambda v: 1.0 / (jnp.sqrt(v.astype(jnp.float32) / correction) + eps), nu)


def clip_factor(optim_config: Any, grads: Any) -> jax.Array:
  """gamma: optax.clip_by_global_norm's scale of the batch gradient (1 when it is not clipped)."""
  clip = float(optim_config.get("clip", 0.0) or 0.0)
  if clip <= 0:
    return jnp.float32(1.0)
  norm = optax.tree.norm(grads)
  return jnp.where(norm < clip, 1.0, clip / norm).astype(jnp.float32)


def make_recording_step(
    loss_fn: Callable, optimizer: optax.GradientTransformation, optim_config: Any, s: Settings
) -> Callable:
  """step(params0, opt_state, direction, batch, t, base=None) -> (opt_state, direction, gamma_t, q_t on the subspace
  or None): the replay step of audit/replay.py (`make_replay_step`, `base` as there) that also returns what the
  decomposition reads."""
  grad_accum = int(optim_config.get("grad_accum", 1))

  def step(params0, opt_state, direction, batch, t, base=None):
    loss = lambda p, b: loss_fn(lora.full_params(base, p), b)
    _, _, grads = gradients.accumulate_gradients(loss, params0, batch, grad_accum)
    updates, opt_state = optimizer.update(grads, opt_state, params0)
    direction = jax.tree.map(lambda d, u: d + u.astype(d.dtype), direction, updates)
    q = preconditioner(optim_config, opt_state, t)
    q_sub = None if q is None else sketch.select(q, s.subspace, s.last_layers)
    return opt_state, direction, clip_factor(optim_config, grads), q_sub

  return jax.jit(step)


def step_weights(optim_config: Any, lrs: Sequence[float], qs: list[Any]) -> list[Any]:
  """M_s for s = 1..T (module docstring) from the rates lr_t and the preconditioners q_t (host dicts of numpy
  arrays, or None for SGD). Overwrites `qs` in place (one copy of the per-step arrays); scalars for SGD."""
  name, T = optim_config.name, len(lrs)
  if name in ("sgd", "rmsprop"):
    mu = float(optim_config.get("momentum", 0.0) or 0.0)
    if name == "sgd":  # optax.sgd: trace, then the rate of step t
      return [np.float32(sum(lrs[t] * mu ** (t - s) for t in range(s, T))) for s in range(T)]
    # optax.rmsprop: the rate of step s, then trace
    totals = [lrs[s] * sum(mu ** (t - s) for t in range(s, T)) for s in range(T)]
    for s in range(T):
      for key in qs[s]:
        qs[s][key] = qs[s][key] * np.float32(totals[s])
    return qs
  b1 = float(optim_config.get("b1", 0.9))
  for s in reversed(range(T)):  # M_s = r_s + b1 M_{s+1}, r_t = lr_t (1 - b1) / (1 - b1^t) q_t
    r = lrs[s] * (1.0 - b1) / (1.0 - b1 ** (s + 1))
    for key in qs[s]:
      qs[s][key] = np.float32(r) * qs[s][key] + (np.float32(b1) * qs[s + 1][key] if s + 1 < T else 0.0)
  return qs


def pair_weight(steps: Sequence[int], gammas: Sequence[float], weights: list[Any], batch_size: int) -> Any:
  """W_j = sum over the (0-based) steps whose batch holds pair j of gamma_s / B M_s (0 when it is in none)."""
  if not steps:
    return np.float32(0.0)
  terms = [(gammas[s] / batch_size, weights[s]) for s in steps]
  if not isinstance(terms[0][1], dict):
    return np.float32(sum(c * m for c, m in terms))
  return {key: sum(np.float32(c) * m[key] for c, m in terms) for key in terms[0][1]}


def make_chunk_sketches(model: Any, chunk_size: int, s: Settings, truncate: bool = True) -> Callable:
  """sketches(params0, rows, dloss_P2, weight, bits, base=None) -> [P, 3, k]: per row of `rows`, which holds one pair
  (`packing.pack_batch`'s layout, or the two-side collated one), S a, S b and S (W * g) with a = grad ln pi(y+),
  b = grad ln pi(y-) at params0 restricted to the subspace, g = dl/ds_w a + dl/ds_l b (`dloss_P2`, the pair's
  `loss_derivatives`), W a subspace dict or a scalar (shared by the rows), `bits` count-sketch's draw
  (`sketch.count_sketch_bits` of the subspace; None for the other projections). Vectorised over the rows (jax.vmap
  of the per-pair vjp): one forward and one backward per side for the whole chunk, the projection inside the
  call, so the per-pair gradients exist only for this chunk (about P x 3 x |subspace| float32) and never for the
  dataset; on 'head_and_last_layers' through a model cut below the subspace (`truncated.split`, once per params0
  object, not per call: no weight gradient below the subspace) and, with count-sketch on packed rows, the head's
  gradient kept as factors (`factored.pair_parts`); `truncate` False: the whole model's backward, the same
  values (benchmarks/decompose_chunk.py compares). With `base` (LoRA; None otherwise) params0 are the adapters,
  differentiated on the fixed base (`lora.full_params`), through the whole model's backward. Filler rows (no loss
  position) give zeros."""

  cut = truncate and truncated.applies(model.config, s.subspace, s.last_layers)

  def one(params0, row, dloss_2, weight, bits, base):
    batch = {key: x[None] for key, x in row.items()}
    if packing.is_packed(batch):  # the row's pair is pair 0 of its one-row batch
      batch["response_pair_BR"] = jnp.where(batch["response_pair_BR"] >= 0, 0, -1)

    net, wrt, head_3K, from_factors = model, params0, 0.0, False
    if cut and base is None:  # stops below the subspace; params0 is `truncated.split`'s
      net, wrt = truncated.stacked_model(model.config, s.last_layers, params0["fixed"]), params0["free"]
      from_factors = factored.applies(model.config, s.subspace, s.last_layers, s.sketch, packing.is_packed(batch))
    if from_factors:  # the head's part comes projected already
      a, b, head_3K = factored.pair_parts(net, wrt, batch, chunk_size, dloss_2, weight, bits, s)
    else:

      def logps(p):
        out = forward.pair_logps(net, lora.full_params(base, p), batch, chunk_size)
        return jnp.stack([out["chosen_logps_B"][0], out["rejected_logps_B"][0]])

      _, vjp = jax.vjp(logps, wrt)
      both = jax.vmap(lambda ct: vjp(ct)[0])(jnp.eye(2, dtype=jnp.float32))  # the two sides' backwards, batched
      a, b = (sketch.select(jax.tree.map(lambda x: x[side], both), s.subspace, s.last_layers) for side in range(2))
    scale = lambda k: weight[k] if isinstance(weight, dict) else weight
    stacked = {k: jnp.stack([a[k], b[k], scale(k) * (dloss_2[0] * a[k] + dloss_2[1] * b[k])]) for k in a}
    return sketch.project_rows(stacked, s.sketch, s.sketch_dim, s.sketch_seed, bits) + head_3K

  batched = jax.jit(jax.vmap(one, in_axes=(None, 0, 0, None, None, None)))
  split = jax.jit(lambda p: truncated.split(p, model.config, s.last_layers))
  held: list[Any] = [None, None]  # (params0, its split): split once per params0, not per call

  def sketches(params0, rows, dloss, weight, bits, base=None):
    if cut and base is None:
      if held[0] is not params0:
        held[:] = [params0, split(params0)]
      params0 = held[1]
    return batched(params0, rows, dloss, weight, bits, base)

  return sketches


def loss_derivatives(
    loss_config: Any,
    chosen0_N: np.ndarray,
    rejected0_N: np.ndarray,
    chosen_ref_N: np.ndarray | None = None,
    rejected_ref_N: np.ndarray | None = None,
) -> np.ndarray:
  """[2, N]: dl_j/ds_w and dl_j/ds_l of every pair's own loss at theta0 (reference log-probs: the start's unless
  given, as for LoRA from model.lora.path, whose reference is the base model)."""

  def one(pc, pr, rc, rr):
    return step_lib.preference_loss(loss_config, pc[None], pr[None], rc[None], rr[None])[0]

  c = jnp.asarray(chosen0_N, jnp.float32)
  r = jnp.asarray(rejected0_N, jnp.float32)
  rc = c if chosen_ref_N is None else jnp.asarray(chosen_ref_N, jnp.float32)
  rr = r if rejected_ref_N is None else jnp.asarray(rejected_ref_N, jnp.float32)
  dw, dl = jax.jit(jax.vmap(jax.grad(one, argnums=(0, 1))))(c, r, rc, rr)
  return np.stack([np.asarray(dw), np.asarray(dl)])


def contributions(sketches_N3K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(C+ [N, N], C- [N, N]): C_ij the first-order change of ln pi(y+_i) (ln pi(y-_i)) caused by pair j's updates,
  <S a_i, U_j> with U_j = -S(W_j * g_j) (`make_chunk_sketches`' rows S a, S b, S(W * g)); float64."""
  x = np.asarray(sketches_N3K, np.float64)
  return -x[:, 0] @ x[:, 2].T, -x[:, 1] @ x[:, 2].T


def split(c_NN: np.ndarray, top: int) -> dict[str, np.ndarray]:
  """{'own' [N], 'others' [N], 'top_rows' [N, m], 'top_values' [N, m]}: the diagonal, the rest of each row, and
  each row's m most negative off-diagonal entries (the pairs pushing it down most; rows with fewer negative
  entries are padded with row -1)."""
  n = c_NN.shape[0]
  own = np.diag(c_NN).copy()
  off = np.where(np.eye(n, dtype=bool), np.inf, c_NN)
  m = min(top, max(n - 1, 0))
  order = np.argsort(off, axis=1, kind="stable")[:, :m]
  values = np.take_along_axis(off, order, axis=1)
  rows = np.where(values < 0, order, -1)
  return {
      "own": own,
      "others": c_NN.sum(axis=1) - own,
      "top_rows": rows,
      "top_values": np.where(values < 0, values, 0.0),
  }


def displaced_by(own_N: np.ndarray, others_N: np.ndarray) -> list[str]:
  """Per pair, the first-order displacement flag: 'none' (own + others >= 0: first order says ln pi(y+) does not
  fall), 'others' (it falls although its own update raises it: the other pairs push it down), 'own' (it falls
  and its own update lowers it too)."""
  return ["none" if o + x >= 0 else ("own" if o < 0 else "others") for o, x in zip(own_N, others_N)]
