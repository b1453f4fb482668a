import time
import jax.numpy as jnp, numpy as np
from displacement_jax import ches

# one pair, D = 2; chosen is right-padded, rejected left-padded, different T and lengths
h_pos_BTD = jnp.array([[[9.0, 9.0], [1.0, 0.0], [1.0, 2.0], [0.0, 0.0]]])  # pos 0 = prompt (not in mask)
m_pos_BT = jnp.array([[0, 1, 1, 0]], bool)  # S+ = (2, 2), |y+| = 2
h_neg_BTD = jnp.array([[[0.0, 0.0], [3.0, 1.0], [0.0, 1.0], [1.0, 1.0], [5.0, 5.0]]])
m_neg_BT = jnp.array([[0, 1, 1, 1, 0]], bool)  # S- = (4, 3), |y-| = 3
print(ches.ches_scores(h_pos_BTD, h_neg_BTD, m_pos_BT, m_neg_BT))  # 14 - 8 = 6
print(ches.ches_scores(h_pos_BTD, h_neg_BTD, m_pos_BT, m_neg_BT, length_normalized=True))  # 14/6 - 8/4
print({k: v.tolist() for k, v in ches.ches_components(h_pos_BTD, h_neg_BTD, m_pos_BT, m_neg_BT).items()})
attn_pos, attn_neg = jnp.array([[1, 1, 1, 0]], bool), jnp.array([[0, 1, 1, 1, 1]], bool)
print(ches.last_hidden_inner_product(h_pos_BTD, h_neg_BTD, attn_pos, attn_neg))  # (1,2).(5,5) = 15

# LLM scale in bf16: d = 4096, 1000 response tokens, entries up to 50 -> finite float32
rng = np.random.default_rng(0)
base = np.clip(rng.normal(0, 15, 4096), -50, 50)
h = jnp.asarray(base + 3 * rng.standard_normal((2, 1, 1000, 4096), dtype=np.float32), jnp.bfloat16)
c = ches.ches_components(h[0], h[1], jnp.ones((1, 1000), bool), jnp.ones((1, 1000), bool))
print(c["ches"], c["chosen_sq_norm"], c["ches"].dtype)

print(ches.minus_normalized_edit_distance([1, 2, 3, 4], [2, 3, 4, 5]))  # 2 edits / 4 = -0.5
a, b = rng.integers(0, 1000, 512), rng.integers(0, 1000, 480)
t0 = time.perf_counter()
ches.levenshtein(a, b)
print(f"512x480 Levenshtein: {1e3 * (time.perf_counter() - t0):.1f} ms")
print(ches.minus_normalized_edit_distance_batch([[1, 2], [5]], [[1, 3], []]))
