"""Shared-prompt packing (data/packing.py): layout, errors, and exactness against the two-side batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from displacement_jax import forward
from displacement_jax.score import core as scoring
from displacement_jax.data import batching, packing
from displacement_jax.data.tokenize import TokenizedPair
from displacement_jax.models.config import ModelConfig
from displacement_jax.models.transformer import Transformer, init_params
from displacement_jax.models.tiny import tiny_hf_config


def _pair(prompt, chosen, rejected, index=0):
  return TokenizedPair(
      np.asarray(prompt, np.int32), np.asarray(chosen, np.int32), np.asarray(rejected, np.int32), index
  )


def _random_pairs(n, vocab=256, seed=0):
  rng = np.random.default_rng(seed)
  ids = lambda lo, hi: rng.integers(3, vocab, size=int(rng.integers(lo, hi + 1)))
  return [_pair(ids(1, 9), ids(1, 12), ids(1, 12), i) for i in range(n)]


def _model(family="llama", **overrides):
  config = ModelConfig.from_hf(
      tiny_hf_config(family, vocab_size=256, **overrides), dtype="float32", param_dtype="float32"
  )
  return Transformer(config), init_params(config, jax.random.key(0))


def test_layout_of_one_pair():
  batch = batching.collate([_pair([5, 6, 7], [8, 9], [10, 11, 12], index=4)], pad_id=0)
  out = packing.pack_batch(batch, multiple=4)
  np.testing.assert_array_equal(out["packed_input_ids_BT"], [[5, 6, 7, 8, 9, 10, 11, 12]])
  np.testing.assert_array_equal(out["packed_positions_BT"], [[0, 1, 2, 3, 4, 3, 4, 5]])
  np.testing.assert_array_equal(out["packed_branch_BT"], [[0, 0, 0, 1, 1, 2, 2, 2]])
  # chosen tokens 8, 9 are predicted from slots 2, 3; rejected 10 from the last prompt slot 2, 11 and 12 from 5, 6.
  np.testing.assert_array_equal(out["response_slot_BR"], [[2, 3, 2, 5, 6, 0, 0, 0]])
  np.testing.assert_array_equal(out["response_label_BR"], [[8, 9, 10, 11, 12, 0, 0, 0]])
  np.testing.assert_array_equal(out["response_side_BR"], [[1, 1, 2, 2, 2, 0, 0, 0]])
  np.testing.assert_array_equal(out["index_B"], [4])
  assert not any(k.startswith(("chosen_", "rejected_")) and k.endswith("_BT") for k in out)  # no two-side arrays
  assert out["chosen_ends_eos_B"].tolist() == [True] and out["rejected_ends_eos_B"].tolist() == [True]  # [B] kept


def test_padding_side_and_filler_rows():
  pairs = _random_pairs(3)
  right = batching.collate(pairs, pad_id=0, padding_side="right", pad_rows_to=4)
  left = batching.collate(pairs, pad_id=0, padding_side="left", pad_rows_to=4)
  a, b = packing.pack_batch(right), packing.pack_batch(left)
  for key in packing.PACKED_KEYS:
    np.testing.assert_array_equal(a[key], b[key])
  assert (a["packed_branch_BT"][3] == packing.PAD).all() and (a["response_side_BR"][3] == 0).all()
  assert packing.packed_lengths(right) == (
      max(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs),
      max(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs),
  )


def test_errors_name_the_pair():
  batch = batching.collate([_pair([5, 6], [7], [8], index=11)], pad_id=0)
  batch["rejected_input_ids_BT"][0, 0] = 9  # the two sides no longer share their prompt
  with pytest.raises(ValueError, match="pair index 11.*different prompts"):
    packing.pack_batch(batch)
  with pytest.raises(ValueError, match="more than pad_to=2"):
    packing.pack_batch(batching.collate([_pair([5, 6], [7], [8])], pad_id=0), pad_to=2)
  model, params = _model()
  with pytest.raises(ValueError, match="branch_BT.*needs explicit positions_BT"):
    model.apply(
        {"params": params}, jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), bool), branch_BT=jnp.zeros((1, 4), jnp.int32)
    )


@pytest.mark.parametrize("family,overrides", [("llama", {}), ("mistral", {"sliding_window": 4}), ("gemma", {})])
def test_packed_hidden_states_equal_each_unpacked_sequence(family, overrides):
  model, params = _model(family, **overrides)
  pairs = _random_pairs(4, seed=1)
  batch = batching.collate(pairs, pad_id=0)
  packed = packing.pack_batch(batch)
  h_packed = np.asarray(jax.jit(forward.packed_forward_hidden, static_argnums=0)(model, params, packed))
  for side, branch in (("chosen", 1), ("rejected", 2)):
    h_side = np.asarray(
        jax.jit(forward.forward_hidden, static_argnums=0)(
            model, params, batch[f"{side}_input_ids_BT"], batch[f"{side}_attention_mask_BT"]
        )
    )
    for b in range(len(pairs)):
      slots = np.flatnonzero(np.isin(packed["packed_branch_BT"][b], (0, branch)))
      n = int(batch[f"{side}_attention_mask_BT"][b].sum())
      np.testing.assert_allclose(h_packed[b, slots], h_side[b, :n], atol=2e-5, rtol=2e-5)


def _assert_logps_and_grads_equal(model, params, batch, packed):
  """Pair log-probs and the gradient of a mixed loss on them: the packed layout equals the two-side batch."""
  logps = lambda p, b: forward.pair_logps(model, p, b, chunk_size=8)

  @jax.jit
  def value_and_grad(p, b):
    loss = lambda p: (lambda o: jnp.sum(o["chosen_logps_B"] - 0.5 * o["rejected_logps_B"]))(logps(p, b))
    return logps(p, b), jax.grad(loss)(p)

  (want, g_want), (got, g_got) = value_and_grad(params, batch), value_and_grad(params, packed)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-4)
  for a, b in zip(jax.tree.leaves(g_want), jax.tree.leaves(g_got)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(a))) + 1e-7)


def test_packed_logps_and_gradients_equal_two_side():
  model, params = _model()
  batch = batching.collate(_random_pairs(6, seed=2), pad_id=0)
  packed = packing.pack_batch(batch)
  _assert_logps_and_grads_equal(model, params, batch, packed)


def test_packed_scoring_equals_two_side_scoring():
  model, params = _model()
  pairs = _random_pairs(10, seed=3)
  run = lambda packing_on: scoring.score_pairs(
      model, params, pairs, batch_size=4, max_length=24, packing=packing_on, progress=False
  )
  two_side, packed = run(False), run(True)
  for a, b in zip(two_side, packed):
    assert a["index"] == b["index"] and a["chosen_len"] == b["chosen_len"]
    assert a["chosen_total_len"] == b["chosen_total_len"] and a["rejected_len"] == b["rejected_len"]
    for key in ("ches", "ln_ches", "last_hidden_inner_product"):
      np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pairs_per_row", [1, 2, 3])
def test_batch_iterator_packs_the_same_rows(pairs_per_row):
  pairs = _random_pairs(12, seed=4)
  kw = dict(seed=3, drop_last=True)
  plain = batching.BatchIterator(pairs, 4, **kw)
  packed_it = batching.BatchIterator(pairs, 4, shared_prompt_packing=True, pairs_per_row=pairs_per_row, **kw)
  shapes = set()
  for _ in range(plain.steps_per_epoch):
    a, b = next(plain), next(packed_it)
    np.testing.assert_array_equal(a["index_B"], b["index_B"])
    want = packing.pack_pairs(a, pairs_per_row=pairs_per_row, bucket=batching.packed_bucket)
    for key in packing.PACKED_KEYS:
      np.testing.assert_array_equal(b[key], want[key])
    assert b["packed_input_ids_BT"].shape[0] == -(-4 // pairs_per_row)
    # every pair's tokens appear exactly once: its prompt + chosen + rejected, in its own segment
    for i, pair in enumerate(pairs[j] for j in a["index_B"]):
      slots = np.flatnonzero(b["response_pair_BR"] == i)
      assert len(slots) == len(pair.chosen_ids) + len(pair.rejected_ids)
    shapes.add((b["packed_input_ids_BT"].shape[0], b["packed_input_ids_BT"].shape[1], b["response_slot_BR"].shape[1]))
  assert shapes <= set(packed_it.packed_shapes(0))  # the shapes announced at start, compiled once each
  assert len(shapes) >= 1


def test_first_fit_decreasing_and_row_plan():
  assert packing.first_fit_decreasing([5, 3, 4, 2], 2, 7) == [[0, 3], [1, 2]]
  assert packing.first_fit_decreasing([5, 5, 5], 2, 7) is None
  # 2 device blocks x 2 micro-batches of 2 pairs, up to 2 pairs per row: each group in one row, strided like
  # gradients.split_micro_batches (micro-batch m = rows m, m + 2, ...) within each device block.
  rows, t, r = packing.plan_pair_rows(
      [10, 20, 30, 40, 50, 60, 70, 80], [5] * 8, pairs_per_row=2, bucket=lambda k: k, groups=2, micro_batches=2
  )
  assert rows == [[0, 2], [1, 3], [4, 6], [5, 7]] and t == 140 and r == 10
  with pytest.raises(ValueError, match="do not split into 2 device block"):
    packing.plan_pair_rows([1, 2, 3], [1, 1, 1], pairs_per_row=2, bucket=lambda k: k, groups=2)


@pytest.mark.parametrize("family,overrides", [("llama", {}), ("mistral", {"sliding_window": 4})])
def test_several_pairs_per_row_equal_each_unpacked_sequence(family, overrides):
  """Pairs sharing a row see only their own segment: hidden states, log-probs and gradients equal the two-side
  batch's (positions restart in every segment; the sliding window counts positions)."""
  model, params = _model(family, **overrides)
  pairs = _random_pairs(6, seed=5)
  batch = batching.collate(pairs, pad_id=0)
  packed = packing.pack_pairs(batch, pairs_per_row=3, bucket=lambda k: k + 3)
  assert packed["packed_input_ids_BT"].shape[0] == 2 and set(np.unique(packed["packed_segment_BT"])) == {-1, 0, 1, 2}
  h_packed = np.asarray(jax.jit(forward.packed_forward_hidden, static_argnums=0)(model, params, packed))
  for side, branch in (("chosen", 1), ("rejected", 2)):
    h_side = np.asarray(
        jax.jit(forward.forward_hidden, static_argnums=0)(
            model, params, batch[f"{side}_input_ids_BT"], batch[f"{side}_attention_mask_BT"]
        )
    )
    for i in range(len(pairs)):
      row = int(np.flatnonzero((packed["response_pair_BR"] == i).any(axis=1))[0])
      seg = packed["packed_segment_BT"][row, packed["response_slot_BR"][row][packed["response_pair_BR"][row] == i][0]]
      in_seg = packed["packed_segment_BT"][row] == seg
      slots = np.flatnonzero(in_seg & np.isin(packed["packed_branch_BT"][row], (0, branch)))
      n = int(batch[f"{side}_attention_mask_BT"][i].sum())
      np.testing.assert_allclose(h_packed[row, slots], h_side[i, :n], atol=2e-5, rtol=2e-5)
  _assert_logps_and_grads_equal(model, params, batch, packed)
