import jax, jax.numpy as jnp, numpy as np
from displacement_jax import logprobs

rng = np.random.default_rng(0)
B, T, D, V = 2, 5, 8, 32
hidden_BTD = jnp.asarray(rng.normal(size=(B, T, D)), jnp.bfloat16)  # final-norm hidden states
unembed_DV = jnp.asarray(rng.normal(size=(D, V)), jnp.bfloat16)  # LM head (embedding.T when tied)
labels_BT = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)  # labels[t] = input_ids[t + 1]
mask_BT = jnp.array([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], bool)  # loss_mask: response predictions only

full = logprobs.sequence_logprobs(
    jnp.einsum("btd,dv->btv", hidden_BTD, unembed_DV, preferred_element_type=jnp.float32), labels_BT, mask_BT
)
chunked = logprobs.chunked_sequence_logprobs(hidden_BTD, unembed_DV, labels_BT, mask_BT, chunk_size=2)
print(full, chunked, chunked.dtype)
print(logprobs.chunked_token_logprobs(hidden_BTD, unembed_DV, labels_BT, chunk_size=2).shape)
try:
  logprobs.token_logprobs(jnp.zeros((B, T, V)), labels_BT.astype(jnp.float32))
except ValueError as e:
  print("ValueError:", e)
