r"""The unconstrained-features model of likelihood displacement (Razin et al., ICLR 2025, Section 4 / App. B).

Trainable unembeddings W [V, D] and hidden representations h; pi(.|x) = softmax(W h_x). Training is gradient
flow on a preference loss l(d), d = ln pi(y+|x) - ln pi(y-|x) (minus the reference margin), whose derivative
at the current point is l' (`loss_derivative`; negative for DPO, so -l' > 0 just scales time). Every rate
below is an exact instantaneous d/dt ln pi(.) along minus the loss gradient over ALL trainable variables,
i.e. the general identity d/dt ln pi(y) = -l' <grad ln pi(y), grad ln pi(y+) - grad ln pi(y-)>.

- `logprob_rate`            Theorem 1/4 (single token): d/dt ln pi(y+) (or of y- with dispreferred=True).
- `token_rates`             Theorem 2/5: d/dt ln pi(z) for every token z -> [V].
- `rank_gainers`            "which tokens gain most if I train y+ over y-?" (ids, optionally rates / names).
- `alpha_coefficients`,
  `multi_token_logprob_rate` Theorem 3/6 (responses of K and K' tokens, y+_1 != y-_1, prefix states trainable).
- `multi_sample_logprob_rate` Theorems 8/9 (N samples sharing W, each with its own h_n).
- `sft_logprob_rate`        Proposition 1: an SFT term lambda (-ln pi(y+)) adds lambda ||grad ln pi(y+)||^2.
- `simulate_gradient_flow`  small-step gradient descent on (W, h) with `losses.per_example_loss`.

All functions are pure, jit-able, and compute in the dtype of W (float32, or float64 with x64 enabled).
The default loss_derivative=-1.0 gives the rates per unit of -l' (the sign is what tells displacement).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from displacement_jax import losses

Array = jax.Array


# ------------------------------------------------------------------------------------------------ checks


def _is_concrete(x: Any) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _float_dtype(W: Any) -> Any:
  """W's floating dtype as JAX will hold it (float64 -> float32 unless x64 is enabled); else float32."""
  dt = jax.dtypes.canonicalize_dtype(W.dtype if hasattr(W, "dtype") else np.asarray(W).dtype)
  return dt if jnp.issubdtype(dt, jnp.floating) else jnp.float32


def _check_W_h(W: Any, h: Any, h_name: str = "h", h_rank: int = 1) -> tuple[Array, Array]:
  """W [V, D] floating; h [..., D] of rank h_rank. Returns both as arrays of W's float dtype."""
  W_shape, h_shape = tuple(np.shape(W)), tuple(np.shape(h))
  if len(W_shape) != 2 or W_shape[0] < 2:
    raise ValueError(f"W must be [V, D] with V >= 2 (unembeddings), got shape {W_shape}")
  if len(h_shape) != h_rank or h_shape[-1] != W_shape[1]:
    want = ", ".join(["N"] * (h_rank - 1) + [str(W_shape[1])])
    raise ValueError(f"{h_name} must be [{want}] (D of W [V, D] = {W_shape}), got shape {h_shape}")
  dt = _float_dtype(W)
  for name, x in (("W", W), (h_name, h)):
    if hasattr(x, "dtype") and not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must be floating, got dtype {x.dtype}")
  return jnp.asarray(W, dt), jnp.asarray(h, dt)


def _check_token(name: str, y: Any, V: int) -> Any:
  """A scalar token id in [0, V) (checked when concrete)."""
  if np.ndim(y) != 0:
    raise ValueError(f"{name} must be a scalar token id, got shape {np.shape(y)}")
  if _is_concrete(y):
    if not float(y).is_integer():
      raise ValueError(f"{name} must be an integer token id, got {y!r}")
    if not 0 <= int(y) < V:
      raise ValueError(f"{name}={int(y)} is out of range for a vocabulary of V={V} tokens")
  return y


def _check_pair(y_pos: Any, y_neg: Any, V: int) -> None:
  _check_token("y_pos", y_pos, V)
  _check_token("y_neg", y_neg, V)
  if _is_concrete(y_pos) and _is_concrete(y_neg) and int(y_pos) == int(y_neg):
    raise ValueError(f"y_pos and y_neg must differ, both are {int(y_pos)}")


def _check_ids(name: str, y: Any, V: int, length: int | None = None) -> Array:
  shape = tuple(np.shape(y))
  if len(shape) != 1 or (length is not None and shape[0] != length) or shape[0] == 0:
    want = f"[{length}]" if length is not None else "[K] with K >= 1"
    raise ValueError(f"{name} must be {want} token ids, got shape {shape}")
  if _is_concrete(y):
    y_np = np.asarray(y)
    if not np.issubdtype(y_np.dtype, np.integer):
      raise ValueError(f"{name} must hold integer token ids, got dtype {y_np.dtype}")
    if y_np.min() < 0 or y_np.max() >= V:
      raise ValueError(f"{name} has ids out of range [0, {V}): min {y_np.min()}, max {y_np.max()}")
  return jnp.asarray(y, jnp.int32)


# ------------------------------------------------------------------------------------------------ single token


def _softmax_V(W_VD: Array, h_D: Array) -> Array:
  return jax.nn.softmax(W_VD @ h_D)


def logprob_rate(
    W: Array, h: Array, y_pos: int, y_neg: int, *, loss_derivative: Any = -1.0, dispreferred: bool = False
) -> Array:
  """Theorem 1/4: d/dt ln pi(y+|x) (or ln pi(y-|x) with dispreferred=True) under gradient flow on (W, h).

  d/dt ln pi(y+) = -l' [ m+ - (1 - p+ + p-) <W+, W-> - sum_{z not y+-} p_z <W_z, W+ - W-> ],
    m+ = (1 - p+) ||W+||^2 + p- ||W-||^2 + (1 - p+ + p-) ||h||^2;
  d/dt ln pi(y-) = -l' [ -m- + (1 + p+ - p-) <W+, W-> - sum_{z not y+-} p_z <W_z, W+ - W-> ],
    m- = (1 - p-) ||W-||^2 + p+ ||W+||^2 + (1 + p+ - p-) ||h||^2.
  W [V, D], h [D], y_pos != y_neg scalar ids, loss_derivative = l' (scalar). Returns a scalar.
  """
  W, h = _check_W_h(W, h)
  _check_pair(y_pos, y_neg, W.shape[0])
  return _logprob_rate(W, h, y_pos, y_neg, jnp.asarray(loss_derivative, W.dtype), dispreferred)


@functools.partial(jax.jit, static_argnames="dispreferred")
def _logprob_rate(W: Array, h: Array, y_pos: Any, y_neg: Any, lp: Array, dispreferred: bool) -> Array:
  """Jitted core of `logprob_rate` (inputs already checked)."""
  V = W.shape[0]
  p = _softmax_V(W, h)
  Wp, Wn = W[y_pos], W[y_neg]
  p_pos, p_neg = p[y_pos], p[y_neg]
  diff = Wp - Wn
  others = jnp.ones((V,), W.dtype).at[y_pos].set(0).at[y_neg].set(0)
  cross = jnp.sum(others * p * (W @ diff))  # sum_{z not y+-} p_z <W_z, W+ - W->
  hh, pn = h @ h, Wp @ Wn
  if dispreferred:
    m = (1 - p_neg) * (Wn @ Wn) + p_pos * (Wp @ Wp) + (1 + p_pos - p_neg) * hh
    bracket = -m + (1 + p_pos - p_neg) * pn - cross
  else:
    m = (1 - p_pos) * (Wp @ Wp) + p_neg * (Wn @ Wn) + (1 - p_pos + p_neg) * hh
    bracket = m - (1 - p_pos + p_neg) * pn - cross
  return -lp * bracket


def token_rates(W: Array, h: Array, y_pos: int, y_neg: int, *, loss_derivative: Any = -1.0) -> Array:
  """Theorem 2/5: d/dt ln pi(z|x) for every token z -> [V].

  For z not in {y+, y-}: -l' [ <W_z, W+ - W-> + c ],  c = (p- - p+) ||h||^2 - sum_z' p_z' <W_z', W+ - W->
  (the sum over all z'); entries y+ / y- hold their Theorem 1 rates (`logprob_rate`).
  """
  W, h = _check_W_h(W, h)
  _check_pair(y_pos, y_neg, W.shape[0])
  return _token_rates(W, h, y_pos, y_neg, jnp.asarray(loss_derivative, W.dtype))


@jax.jit
def _token_rates(W: Array, h: Array, y_pos: Any, y_neg: Any, lp: Array) -> Array:
  p = _softmax_V(W, h)
  proj_V = W @ (W[y_pos] - W[y_neg])
  c = (p[y_neg] - p[y_pos]) * (h @ h) - p @ proj_V
  rates_V = -lp * (proj_V + c)
  rates_V = rates_V.at[y_pos].set(_logprob_rate(W, h, y_pos, y_neg, lp, False))
  return rates_V.at[y_neg].set(_logprob_rate(W, h, y_pos, y_neg, lp, True))


class Gainers(NamedTuple):
  """Predicted gainers, best first: token ids [k], rates d/dt ln pi [k], names (tuple of str, or None)."""

  ids: np.ndarray
  rates: np.ndarray
  names: tuple[str, ...] | None


def rank_gainers(
    W: Array,
    h: Array,
    y_pos: int,
    y_neg: int,
    k: int | None = None,
    *,
    loss_derivative: Any = -1.0,
    tokenizer: Any = None,
    return_rates: bool = False,
) -> np.ndarray | Gainers:
  """Tokens other than y+ / y- ranked by predicted d/dt ln pi(z) (Theorem 2), largest first (ties: lower id).

  Returns the top-k ids (all V - 2 when k is None) as an int array; with return_rates=True or a `tokenizer`
  (anything with convert_ids_to_tokens or decode) a `Gainers` (ids, rates, names). Not jit-able (host ranking).
  """
  W, h = _check_W_h(W, h)
  V = W.shape[0]
  if k is not None and (int(k) != k or not 1 <= int(k) <= V - 2):
    raise ValueError(f"k must be an integer in [1, V - 2 = {V - 2}], got {k!r}")
  rates = np.asarray(token_rates(W, h, y_pos, y_neg, loss_derivative=loss_derivative), np.float64)
  masked = rates.copy()
  masked[[int(y_pos), int(y_neg)]] = -np.inf
  order = np.lexsort((np.arange(V), -masked))[: V - 2]
  ids = order[:k] if k is not None else order
  if tokenizer is None and not return_rates:
    return ids
  names = None
  if tokenizer is not None:
    if hasattr(tokenizer, "convert_ids_to_tokens"):
      names = tuple(str(t) for t in tokenizer.convert_ids_to_tokens([int(i) for i in ids]))
    else:
      names = tuple(str(tokenizer.decode([int(i)])) for i in ids)
  return Gainers(ids=ids, rates=rates[ids], names=names)


# ------------------------------------------------------------------------------------------------ multi token


def _seq_probs(W: Array, H_KD: Array) -> Array:
  return jax.nn.softmax(H_KD @ W.T, axis=-1)  # [K, V]


def _residuals(W: Array, H_KD: Array, y_K: Array) -> Array:
  """u_k = e_{y_k} - pi(.|prefix k) -> [K, V]."""
  return jax.nn.one_hot(y_K, W.shape[0], dtype=W.dtype) - _seq_probs(W, H_KD)


def alpha_coefficients(
    W: Array, H_pos_KD: Array, H_neg_KD: Array, y_pos_K: Array, y_neg_K: Array
) -> tuple[Array, Array]:
  """(a+ [K, K], a- [K, K']) of Theorem 3: a-_{kk'} = <e_{y+_k} - pi(.|x,y+<k), e_{y-_k'} - pi(.|x,y-<k')>,
  a+_{kk'} = <e_{y+_k} - pi(.|x,y+<k), e_{y+_k'} - pi(.|x,y+<k')>. H_*[k] is the hidden state of prefix k."""
  W, H_pos_KD, H_neg_KD, y_pos_K, y_neg_K = _check_multi(W, H_pos_KD, H_neg_KD, y_pos_K, y_neg_K)
  return _alpha_coefficients(W, H_pos_KD, H_neg_KD, y_pos_K, y_neg_K)


@jax.jit
def _alpha_coefficients(W, H_pos_KD, H_neg_KD, y_pos_K, y_neg_K):
  u_pos, u_neg = _residuals(W, H_pos_KD, y_pos_K), _residuals(W, H_neg_KD, y_neg_K)
  return u_pos @ u_pos.T, u_pos @ u_neg.T


def _check_multi(W, H_pos_KD, H_neg_KD, y_pos_K, y_neg_K):
  W, H_pos_KD = _check_W_h(W, H_pos_KD, "H_pos_KD", 2)
  _, H_neg_KD = _check_W_h(W, H_neg_KD, "H_neg_KD", 2)
  V = W.shape[0]
  y_pos_K = _check_ids("y_pos_K", y_pos_K, V, H_pos_KD.shape[0])
  y_neg_K = _check_ids("y_neg_K", y_neg_K, V, H_neg_KD.shape[0])
  if _is_concrete(y_pos_K) and _is_concrete(y_neg_K) and np.asarray(y_pos_K)[0] == np.asarray(y_neg_K)[0]:
    raise ValueError(f"Theorem 3 needs y_pos_K[0] != y_neg_K[0], both are {int(np.asarray(y_pos_K)[0])}")
  if (
      _is_concrete(H_pos_KD)
      and _is_concrete(H_neg_KD)
      and not np.array_equal(np.asarray(H_pos_KD)[0], np.asarray(H_neg_KD)[0])
  ):
    raise ValueError(
        "H_pos_KD[0] and H_neg_KD[0] are both h_x (the hidden state of the prompt, the empty "
        "response prefix) and must be equal"
    )
  return W, H_pos_KD, H_neg_KD, y_pos_K, y_neg_K


@jax.jit
def alpha_weighted_inner(H_pos_KD: Array, H_neg_KD: Array, a_pos_KK: Array, a_neg_KK: Array) -> Array:
  """sum_{kk'} a+_{kk'} <h+_k, h+_k'> - sum_{kk'} a-_{kk'} <h+_k, h-_k'> (the h-inner-product part of Thm 3).

  With every a set to 1 it is ||sum_k h+_k||^2 - <sum_k h+_k, sum_k' h-_k'> = -CHES(x, y+, y-).
  """
  return jnp.sum(a_pos_KK * (H_pos_KD @ H_pos_KD.T)) - jnp.sum(a_neg_KK * (H_pos_KD @ H_neg_KD.T))


def multi_token_logprob_rate(
    W: Array,
    H_pos_KD: Array,
    H_neg_KD: Array,
    y_pos_K: Array,
    y_neg_K: Array,
    *,
    loss_derivative: Any = -1.0,
    dispreferred: bool = False,
) -> Array:
  """Theorem 3/6, exact: d/dt ln pi(y+|x) for responses of K (y+) and K' (y-) tokens, y+_1 != y-_1.

  Trainable: W and the hidden state of every distinct prefix; H_pos_KD[k] = h_{x,y+<k}, H_neg_KD[k'] =
  h_{x,y-<k'}, and row 0 of both is the same variable h_x. With u+_k = e_{y+_k} - pi(.|x,y+<k) (u- alike):
    d/dt ln pi(y+) = -l' [ sum_{kk'} a+_{kk'} <h+_k, h+_k'> - sum_{kk'} a-_{kk'} <h+_k, h-_k'>
                           + sum_k ||W^T u+_k||^2 - <W^T u+_1, W^T u-_1> ]
  (the first two sums are the W-gradient part, the last two the hidden states' own gradients; with K=K'=1
  this is Theorem 1). dispreferred=True gives d/dt ln pi(y-) (roles swapped, overall sign flipped).
  """
  W, H_pos_KD, H_neg_KD, y_pos_K, y_neg_K = _check_multi(W, H_pos_KD, H_neg_KD, y_pos_K, y_neg_K)
  return _multi_token_rate(W, H_pos_KD, H_neg_KD, y_pos_K, y_neg_K, jnp.asarray(loss_derivative, W.dtype), dispreferred)


@functools.partial(jax.jit, static_argnames="dispreferred")
def _multi_token_rate(W, H_pos_KD, H_neg_KD, y_pos_K, y_neg_K, lp, dispreferred):
  u_pos, u_neg = _residuals(W, H_pos_KD, y_pos_K), _residuals(W, H_neg_KD, y_neg_K)
  g_pos, g_neg = u_pos @ W, u_neg @ W  # [K, D]: W^T u_k
  if dispreferred:  # <g-, g+ - g-> = -( <g-,g-> - <g-,g+> )
    a_self, a_cross = u_neg @ u_neg.T, u_neg @ u_pos.T
    bracket = (
        jnp.sum(a_self * (H_neg_KD @ H_neg_KD.T))
        - jnp.sum(a_cross * (H_neg_KD @ H_pos_KD.T))
        + jnp.sum(g_neg * g_neg)
        - g_neg[0] @ g_pos[0]
    )
    return lp * bracket
  a_pos, a_neg = u_pos @ u_pos.T, u_pos @ u_neg.T
  bracket = alpha_weighted_inner(H_pos_KD, H_neg_KD, a_pos, a_neg) + jnp.sum(g_pos * g_pos) - g_pos[0] @ g_neg[0]
  return -lp * bracket


# ------------------------------------------------------------------------------------------------ multi sample


def _check_multi_sample(W, H_ND, y_pos_N, y_neg_N, loss_derivative):
  W, H_ND = _check_W_h(W, H_ND, "H_ND", 2)
  N, V = H_ND.shape[0], W.shape[0]
  y_pos_N = _check_ids("y_pos_N", y_pos_N, V, N)
  y_neg_N = _check_ids("y_neg_N", y_neg_N, V, N)
  if _is_concrete(y_pos_N) and _is_concrete(y_neg_N) and np.any(np.asarray(y_pos_N) == np.asarray(y_neg_N)):
    n = int(np.flatnonzero(np.asarray(y_pos_N) == np.asarray(y_neg_N))[0])
    raise ValueError(f"y_pos_N and y_neg_N must differ for every sample; sample {n} has both = {int(y_pos_N[n])}")
  lp_N = jnp.broadcast_to(jnp.asarray(loss_derivative, W.dtype), (N,)) if np.ndim(loss_derivative) == 0 else None
  if lp_N is None:
    if tuple(np.shape(loss_derivative)) != (N,):
      raise ValueError(f"loss_derivative must be a scalar or [N={N}], got shape {np.shape(loss_derivative)}")
    lp_N = jnp.asarray(loss_derivative, W.dtype)
  return W, H_ND, y_pos_N, y_neg_N, lp_N


def cross_sample_coefficients(
    W: Array, H_ND: Array, y_pos_N: Array, y_neg_N: Array, *, dispreferred: bool = False
) -> Array:
  """a [N, N] of Theorems 8/9: a[x, x~] = 1[y+ = y~+] - 1[y+ = y~-] + pi(y~-|x) - pi(y~+|x) (y = y- if
  dispreferred), the coupling of sample x~'s gradient step into ln pi(y|x) through the shared W."""
  W, H_ND, y_pos_N, y_neg_N, _ = _check_multi_sample(W, H_ND, y_pos_N, y_neg_N, -1.0)
  return _cross_sample_coefficients(W, H_ND, y_pos_N, y_neg_N, dispreferred)


def _cross_sample_coefficients(W, H_ND, y_pos_N, y_neg_N, dispreferred):
  p_NV = jax.nn.softmax(H_ND @ W.T, axis=-1)
  y_N = y_neg_N if dispreferred else y_pos_N
  same = lambda a_N, b_N: (a_N[:, None] == b_N[None, :]).astype(W.dtype)
  return same(y_N, y_pos_N) - same(y_N, y_neg_N) + p_NV[:, y_neg_N] - p_NV[:, y_pos_N]


def multi_sample_logprob_rate(
    W: Array, H_ND: Array, y_pos_N: Array, y_neg_N: Array, *, loss_derivative: Any = -1.0, dispreferred: bool = False
) -> Array:
  """Theorems 8/9: d/dt ln pi(y+_x|x) for every sample x -> [N], loss = mean_n l(d_n), W shared, h_n own.

  rate_x = (1/N) Theorem 1 rate of x (with l'_x) + sum_{x~ != x} (-l'_{x~} / N) a[x, x~] <h_x, h_x~>.
  loss_derivative: scalar or [N] (l'_n of each sample). dispreferred=True: rates of ln pi(y-_x|x).
  """
  W, H_ND, y_pos_N, y_neg_N, lp_N = _check_multi_sample(W, H_ND, y_pos_N, y_neg_N, loss_derivative)
  return _multi_sample_rate(W, H_ND, y_pos_N, y_neg_N, lp_N, dispreferred)


@functools.partial(jax.jit, static_argnames="dispreferred")
def _multi_sample_rate(W, H_ND, y_pos_N, y_neg_N, lp_N, dispreferred):
  N = H_ND.shape[0]
  own_N = jax.vmap(lambda h, yp, yn, lp: _logprob_rate(W, h, yp, yn, lp, dispreferred))(H_ND, y_pos_N, y_neg_N, lp_N)
  a_NN = _cross_sample_coefficients(W, H_ND, y_pos_N, y_neg_N, dispreferred)
  off_NN = 1.0 - jnp.eye(N, dtype=W.dtype)
  cross_N = jnp.sum(off_NN * (-lp_N[None, :]) * a_NN * (H_ND @ H_ND.T), axis=1)
  return (own_N + cross_N) / N


# ------------------------------------------------------------------------------------------------ SFT term


def grad_sq_norm(W: Array, h: Array, y: int) -> Array:
  """||grad_{W,h} ln pi(y|x)||^2 = ||e_y - p||^2 ||h||^2 + ||W_y - sum_z p_z W_z||^2."""
  W, h = _check_W_h(W, h)
  _check_token("y", y, W.shape[0])
  return _grad_sq_norm(W, h, y)


@jax.jit
def _grad_sq_norm(W: Array, h: Array, y: Any) -> Array:
  u = jax.nn.one_hot(y, W.shape[0], dtype=W.dtype) - _softmax_V(W, h)
  g = u @ W
  return (u @ u) * (h @ h) + g @ g


def sft_logprob_rate(
    W: Array, h: Array, y_pos: int, y_neg: int, *, loss_derivative: Any = -1.0, sft_coeff: Any = 0.0
) -> Array:
  """Proposition 1: loss l(d) + sft_coeff (-ln pi(y+)) gives d/dt ln pi(y+) = Theorem 1 + sft_coeff ||grad ln pi(y+)||^2."""
  lam = jnp.asarray(sft_coeff, _float_dtype(W))
  return logprob_rate(W, h, y_pos, y_neg, loss_derivative=loss_derivative) + lam * grad_sq_norm(W, h, y_pos)


# ------------------------------------------------------------------------------------------------ gradient flow


def loss_derivative_at(
    loss: str, W: Array, h: Array, y_pos: int, y_neg: int, *, beta: float, ref_margin: Any = 0.0
) -> Array:
  """l' of `loss` at the current (W, h), via `losses.loss_derivative` (float32)."""
  W, h = _check_W_h(W, h)
  logp = jax.nn.log_softmax(W @ h)
  return losses.loss_derivative(loss, logp[y_pos] - logp[y_neg], beta=beta, ref_margin=ref_margin)


class Trajectory(NamedTuple):
  """Output of `simulate_gradient_flow`; T = steps // record_every + 1 records (step 0 included)."""

  steps_T: np.ndarray  # [T] step index of each record
  logp_TNV: np.ndarray  # [T, N, V] ln pi(z|x_n) for every token and sample
  loss_T: np.ndarray  # [T] total loss (preference + SFT)
  W_VD: np.ndarray  # final W
  h_ND: np.ndarray  # final h


def _as_samples(samples: Any, N: int, V: int) -> tuple[np.ndarray, np.ndarray]:
  arr = np.asarray(samples)
  if arr.ndim == 1 and arr.shape == (2,):
    arr = arr[None]
  if arr.ndim != 2 or arr.shape != (N, 2) or not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(
        f"samples must be N={N} integer (y_pos, y_neg) pairs (shape [{N}, 2]), got shape "
        f"{arr.shape} dtype {arr.dtype}"
    )
  _check_multi_sample(np.zeros((V, 1)), np.zeros((N, 1)), arr[:, 0], arr[:, 1], -1.0)
  return arr[:, 0], arr[:, 1]


def _logp_NV(params: tuple[Array, Array]) -> Array:
  return jax.nn.log_softmax(params[1] @ params[0].T, axis=-1)


def _pair_logps(logp_NV: Array, y_NP: Array) -> Array:
  """[N, 2]: ln pi(y+_n), ln pi(y-_n)."""
  return jnp.take_along_axis(logp_NV, y_NP, axis=1)


def _flow_loss(params, y_NP, ref_NP, hyper, loss: str) -> Array:
  s = _pair_logps(_logp_NV(params), y_NP)
  per_N = losses.per_example_loss(loss, s[:, 0], s[:, 1], ref_NP[:, 0], ref_NP[:, 1], beta=hyper[1])
  return jnp.mean(per_N) + hyper[2] * jnp.mean(-s[:, 0])


@functools.partial(jax.jit, static_argnames=("loss", "record_every", "train_h"))
def _flow_chunk(params, y_NP, ref_NP, hyper, *, loss: str, record_every: int, train_h: bool):
  """`record_every` gradient steps (lr = hyper[0]); returns (params, ln pi [N, V], loss) after them."""

  def step(params, _):
    g = jax.grad(_flow_loss)(params, y_NP, ref_NP, hyper, loss)
    gh = g[1] if train_h else jnp.zeros_like(g[1])
    return (
        params[0] - hyper[0] * g[0].astype(params[0].dtype),
        params[1] - hyper[0] * gh.astype(params[1].dtype),
    ), None

  params, _ = jax.lax.scan(step, params, None, length=record_every)
  return params, _logp_NV(params), _flow_loss(params, y_NP, ref_NP, hyper, loss)


def simulate_gradient_flow(
    loss: str,
    W: Array,
    h: Array,
    samples: Any,
    lr: float,
    steps: int,
    *,
    record_every: int = 1,
    beta: float = 0.1,
    sft_coeff: float = 0.0,
    train_h: bool = True,
    show_progress: bool = False,
) -> Trajectory:
  """Gradient descent with a small step `lr` (an Euler integration of gradient flow) on (W, h).

  loss: an objective of `losses.per_example_loss` that uses the margin ('dpo', 'ipo', 'slic', 'gpo', 'dpop');
  reference log-probs are those at initialisation. Loss = mean over samples + sft_coeff * mean(-ln pi(y+)).
  W [V, D]; h [D] (one sample) or [N, D]; samples: (y_pos, y_neg) or [N, 2] pairs. Records every
  `record_every` steps (and step 0). Runs as a jitted lax.scan per record chunk (tqdm with show_progress).
  """
  if loss not in losses.OBJECTIVES or loss == "cross_entropy":
    raise ValueError(f'loss must be one of {[o for o in losses.OBJECTIVES if o != "cross_entropy"]}, ' f"got {loss!r}")
  if np.ndim(h) == 1:
    h = np.asarray(h)[None]
  W, h = _check_W_h(W, h, "h", 2)
  N, V = h.shape[0], W.shape[0]
  y_pos_N, y_neg_N = (jnp.asarray(y, jnp.int32) for y in _as_samples(samples, N, V))
  if not (int(steps) == steps and steps >= 1 and int(record_every) == record_every and record_every >= 1):
    raise ValueError(f"steps and record_every must be positive integers, got {steps!r}, {record_every!r}")
  if not float(lr) > 0 or not float(beta) > 0:
    raise ValueError(f"lr and beta must be > 0, got lr={lr!r}, beta={beta!r}")
  y_NP = jnp.stack([y_pos_N, y_neg_N], axis=1)
  ref_NP = _pair_logps(_logp_NV((W, h)), y_NP)
  hyper = jnp.asarray([lr, beta, sft_coeff], W.dtype)
  chunk = functools.partial(_flow_chunk, loss=loss, record_every=int(record_every), train_h=bool(train_h))
  params = (W, h)
  n_rec = int(steps) // int(record_every)
  logps = [np.asarray(_logp_NV(params))]
  loss_vals = [float(_flow_loss(params, y_NP, ref_NP, hyper, loss))]
  it = range(n_rec)
  if show_progress:
    it = tqdm(it, desc=f"gradient flow ({loss})", unit="record")
  for _ in it:
    params, lp, lv = chunk(params, y_NP, ref_NP, hyper)
    logps.append(np.asarray(lp))
    loss_vals.append(float(lv))
  return Trajectory(
      steps_T=np.arange(n_rec + 1) * int(record_every),
      logp_TNV=np.stack(logps),
      loss_T=np.asarray(loss_vals),
      W_VD=np.asarray(params[0]),
      h_ND=np.asarray(params[1]),
  )
