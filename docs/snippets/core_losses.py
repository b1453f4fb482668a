import jax, jax.numpy as jnp, numpy as np
from displacement_jax import losses

s_w, s_l = jnp.array([-10.0, -20.0]), jnp.array([-12.0, -15.0])  # policy summed log-probs
r_w, r_l = jnp.array([-11.0, -19.5]), jnp.array([-11.0, -15.5])  # reference (initial model)
loss, metrics = losses.preference_loss("dpo", s_w, s_l, r_w, r_l, beta=0.1, sft_coeff=0.5)
print(f"{float(loss):.6f}")
print({k: round(float(v), 6) for k, v in metrics.items()})
print(
    float(losses.ipo_loss(s_w, s_l, r_w, r_l, beta=0.1)),
    float(losses.dpop_loss(s_w, s_l, r_w, r_l, beta=0.1, dpop_lambda=50.0)),
    float(losses.gpo_loss(s_w, s_l, r_w, r_l, beta=0.1, fn="hinge")),
)
print(losses.loss_derivative("dpo", s_w - s_l, beta=0.1, ref_margin=r_w - r_l))  # l' per sample
dpo_grad = jax.grad(lambda sl: losses.dpo_loss(s_w, sl, r_w, r_l, beta=0.1))
print(dpo_grad(s_w - 1e4), dpo_grad(s_w + 1e4))  # d = +1e4 / -1e4: finite, 0 and beta/B
try:
  losses.preference_loss("kto", s_w, s_l, r_w, r_l, beta=0.1)
except ValueError as e:
  print("ValueError:", e)
