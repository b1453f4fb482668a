r"""Tiny offline gradient-flow demo of the unconstrained-features theory (displacement_jax.theory).

Two single-token DPO problems on random unembeddings W [V, D] and a trainable hidden state h [D]:
  * "aligned":    W- = 2 W+ (same direction, larger norm) -> Theorem 1 predicts ln pi(y+) DEcreases;
  * "orthogonal": W+ orthogonal to W-                    -> Theorem 1 predicts ln pi(y+) INcreases.
For each, the prediction at initialisation (Theorem 1 rate, Theorem 2 top gainers) is printed next to what
small-step gradient descent actually does; a PNG plots the ln pi trajectories.

  python examples/theory_gradient_flow.py [--out runs/theory_gradient_flow.png] [--steps 150] [--lr 0.2]
"""

from __future__ import annotations

import argparse
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout without `pip install -e .`
  sys.path.insert(0, ROOT)

from displacement_jax import theory  # pylint: disable=g-import-not-at-top,wrong-import-position

V, D, Y_POS, Y_NEG, BETA = 12, 6, 0, 1, 0.1


def make_problem(kind: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """W [V, D], h [D] with W+ / W- aligned (displacement) or orthogonal (no displacement)."""
  rng = np.random.default_rng(seed)
  W = rng.normal(size=(V, D)) * 0.3
  W[Y_POS], W[Y_NEG] = 0.0, 0.0
  if kind == "aligned":
    W[Y_POS, 0], W[Y_NEG, 0] = 2.0, 4.0
  else:
    W[Y_POS, 0], W[Y_NEG, 1] = 2.0, 2.0
  h = np.zeros(D)
  h[2:] = rng.normal(size=D - 2) * 0.3  # orthogonal to W+ and W-: p(y+) ~ p(y-) at the start
  return W.astype(np.float32), h.astype(np.float32)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="runs/theory_gradient_flow.png")
  parser.add_argument("--steps", type=int, default=150)
  parser.add_argument("--lr", type=float, default=0.2)
  args = parser.parse_args()

  fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
  for ax, kind in zip(axes, ("aligned", "orthogonal")):
    W, h = make_problem(kind)
    lp0 = float(theory.loss_derivative_at("dpo", W, h, Y_POS, Y_NEG, beta=BETA))
    rate_pos = float(theory.logprob_rate(W, h, Y_POS, Y_NEG, loss_derivative=lp0))
    rate_neg = float(theory.logprob_rate(W, h, Y_POS, Y_NEG, loss_derivative=lp0, dispreferred=True))
    gainers = theory.rank_gainers(W, h, Y_POS, Y_NEG, 3, loss_derivative=lp0, return_rates=True)
    traj = theory.simulate_gradient_flow(
        "dpo", W, h, (Y_POS, Y_NEG), lr=args.lr, steps=args.steps, record_every=5, beta=BETA
    )
    logp_TV = traj.logp_TNV[:, 0]
    first = (traj.logp_TNV[1, 0] - traj.logp_TNV[0, 0]) / (args.lr * traj.steps_T[1])
    change_V = logp_TV[1] - logp_TV[0]  # short-time gains (first record), what Theorem 2 ranks
    observed = [int(t) for t in np.argsort(-np.where(np.isin(np.arange(V), [Y_POS, Y_NEG]), -np.inf, change_V))[:3]]
    print(
        f"[{kind}] <W+,W->={W[Y_POS] @ W[Y_NEG]:.2f} ||W+||={np.linalg.norm(W[Y_POS]):.2f} "
        f"||W-||={np.linalg.norm(W[Y_NEG]):.2f} ||h||={np.linalg.norm(h):.2f}"
    )
    print(
        f"  predicted d/dt ln pi(y+) = {rate_pos:+.5f}  (observed over the first 5 steps {first[Y_POS]:+.5f})  "
        f'-> {"DISPLACEMENT" if rate_pos < 0 else "no displacement"} predicted'
    )
    print(f"  predicted d/dt ln pi(y-) = {rate_neg:+.5f}  (observed over the first 5 steps {first[Y_NEG]:+.5f})")
    print(
        f"  after {args.steps} steps: ln pi(y+) {logp_TV[0, Y_POS]:.3f} -> min {logp_TV[:, Y_POS].min():.3f} "
        f"(step {traj.steps_T[np.argmin(logp_TV[:, Y_POS])]}) -> {logp_TV[-1, Y_POS]:.3f}, "
        f"ln pi(y-) {logp_TV[0, Y_NEG]:.3f} -> {logp_TV[-1, Y_NEG]:.3f}, "
        f"loss {traj.loss_T[0]:.4f} -> {traj.loss_T[-1]:.4f}"
    )
    print(
        f"  predicted top gainers {gainers.ids.tolist()} (rates {np.round(gainers.rates, 4).tolist()}), "
        f"observed top gainers over the first 5 steps {observed}"
    )
    for z in range(V):
      style = (
          dict(lw=2.5, color="C2", label="y+")
          if z == Y_POS
          else (dict(lw=2.5, color="C3", label="y-") if z == Y_NEG else dict(lw=0.8, color="0.6", alpha=0.7))
      )
      ax.plot(traj.steps_T, logp_TV[:, z], **style)
    ax.set_title(f"{kind}: predicted rate(y+) = {rate_pos:+.3g}")
    ax.set_xlabel("gradient step")
    ax.set_ylabel("ln pi(z | x)")
    ax.legend()
  fig.tight_layout()
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  fig.savefig(args.out, dpi=100)
  print(f"saved {args.out}")


if __name__ == "__main__":
  main()
