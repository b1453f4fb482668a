"""Tests for displacement_jax.ches: plain-loop references, padding invariance, bf16, scale, edit distance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from displacement_jax import ches


def _loop_ches(h_pos, h_neg, m_pos, m_neg):
  """Definition 2/3 by plain Python loops in float64: (CHES, LN-CHES) per row."""
  out = []
  for b in range(h_pos.shape[0]):
    d = h_pos.shape[-1]
    s_pos, s_neg = [0.0] * d, [0.0] * d
    n_pos = n_neg = 0
    for t in range(h_pos.shape[1]):
      if m_pos[b, t]:
        n_pos += 1
        for i in range(d):
          s_pos[i] += float(h_pos[b, t, i])
    for t in range(h_neg.shape[1]):
      if m_neg[b, t]:
        n_neg += 1
        for i in range(d):
          s_neg[i] += float(h_neg[b, t, i])
    inner = sum(s_pos[i] * s_neg[i] for i in range(d))
    sq = sum(s_pos[i] * s_pos[i] for i in range(d))
    out.append((inner - sq, inner / (n_pos * n_neg) - sq / n_pos**2))
  return np.array(out)


def _segment_masks(rng, b, t, max_len):
  """Contiguous loss-mask segments [start, start + len) of random lengths/offsets."""
  mask = np.zeros((b, t), bool)
  for i in range(b):
    n = rng.integers(1, max_len + 1)
    start = rng.integers(0, t - n + 1)
    mask[i, start : start + n] = True
  return mask


def test_ches_matches_python_loop_definition():
  rng = np.random.default_rng(0)
  b, tc, tr, d = 3, 9, 6, 5  # different T for the chosen and rejected sides
  h_pos = rng.normal(size=(b, tc, d)).astype(np.float32)
  h_neg = rng.normal(size=(b, tr, d)).astype(np.float32)
  m_pos, m_neg = _segment_masks(rng, b, tc, 7), _segment_masks(rng, b, tr, 5)
  ref = _loop_ches(h_pos, h_neg, m_pos, m_neg)
  out = ches.ches_scores(h_pos, h_neg, m_pos, m_neg)
  out_ln = ches.ches_scores(h_pos, h_neg, m_pos.astype(np.int32), m_neg.astype(np.int32), length_normalized=True)
  assert out.dtype == jnp.float32 and out.shape == (b,)
  np.testing.assert_allclose(out, ref[:, 0], rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(out_ln, ref[:, 1], rtol=1e-5, atol=1e-5)
  # jit (length_normalized is static), and the components are consistent with the definition
  jitted = jax.jit(ches.ches_scores, static_argnames="length_normalized")
  np.testing.assert_allclose(
      jitted(h_pos, h_neg, m_pos, m_neg, length_normalized=True), ref[:, 1], rtol=1e-5, atol=1e-5
  )
  comps = ches.ches_components(h_pos, h_neg, m_pos, m_neg)
  s_pos = (h_pos.astype(np.float64) * m_pos[..., None]).sum(1)
  s_neg = (h_neg.astype(np.float64) * m_neg[..., None]).sum(1)
  np.testing.assert_allclose(comps["inner"], (s_pos * s_neg).sum(-1), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(comps["chosen_sq_norm"], (s_pos**2).sum(-1), rtol=1e-5)
  np.testing.assert_allclose(comps["rejected_sq_norm"], (s_neg**2).sum(-1), rtol=1e-5)
  np.testing.assert_allclose(comps["chosen_len"], m_pos.sum(1))
  np.testing.assert_allclose(comps["rejected_len"], m_neg.sum(1))
  cos = (s_pos * s_neg).sum(-1) / np.linalg.norm(s_pos, axis=-1) / np.linalg.norm(s_neg, axis=-1)
  np.testing.assert_allclose(comps["cosine"], cos, rtol=1e-5, atol=1e-6)


def test_ln_ches_hand_values_with_different_lengths():
  # chosen: h = (1,0), (1,2) -> S+ = (2,2), |y+| = 2;  rejected: (3,1), (0,1), (1,1) -> S- = (4,3), |y-| = 3
  # CHES = <S+,S-> - |S+|^2 = 14 - 8 = 6;  LN-CHES = 14/6 - 8/4 = 1/3
  h_pos = np.array([[[9, 9], [1, 0], [1, 2]]], np.float32)  # position 0 = prompt, outside the mask
  h_neg = np.array([[[3, 1], [0, 1], [1, 1], [7, 7]]], np.float32)  # position 3 = padding
  m_pos, m_neg = np.array([[0, 1, 1]], bool), np.array([[1, 1, 1, 0]], bool)
  np.testing.assert_allclose(ches.ches_scores(h_pos, h_neg, m_pos, m_neg), [6.0], rtol=1e-6)
  np.testing.assert_allclose(ches.ches_scores(h_pos, h_neg, m_pos, m_neg, length_normalized=True), [1 / 3], rtol=1e-6)


def _place(rows, t, side, fill):
  """Stack variable-length [n_i, D] rows into [B, T, D] with `side` padding filled with `fill`, + mask."""
  d = rows[0].shape[-1]
  h = np.full((len(rows), t, d), fill, np.float32)
  mask = np.zeros((len(rows), t), bool)
  for i, r in enumerate(rows):
    sl = slice(0, len(r)) if side == "right" else slice(t - len(r), t)
    h[i, sl], mask[i, sl] = r, True
  return h, mask


def test_invariant_to_padding_side_and_amount():
  rng = np.random.default_rng(1)
  d = 4
  pos_rows = [rng.normal(size=(n, d)).astype(np.float32) for n in (3, 6)]
  neg_rows = [rng.normal(size=(n, d)).astype(np.float32) for n in (5, 2)]
  results = []
  # padding positions hold inf / huge garbage: they must never enter a sum
  for side, extra, fill in [("right", 0, np.inf), ("left", 0, -1e30), ("right", 5, np.nan), ("left", 9, 1e30)]:
    h_pos, m_pos = _place(pos_rows, 6 + extra, side, fill)
    h_neg, m_neg = _place(neg_rows, 5 + 2 * extra, "left" if side == "right" else "right", fill)
    results.append(
        (
            ches.ches_scores(h_pos, h_neg, m_pos, m_neg),
            ches.ches_scores(h_pos, h_neg, m_pos, m_neg, length_normalized=True),
            ches.last_hidden_inner_product(h_pos, h_neg, m_pos, m_neg),
        )
    )
  s_pos = np.array([r.astype(np.float64).sum(0) for r in pos_rows])
  s_neg = np.array([r.astype(np.float64).sum(0) for r in neg_rows])
  expected = (
      (s_pos * (s_neg - s_pos)).sum(-1),
      (s_pos / [[3], [6]] * (s_neg / [[5], [2]] - s_pos / [[3], [6]])).sum(-1),
      np.array([(p[-1] * n[-1]).sum() for p, n in zip(pos_rows, neg_rows)]),
  )
  for res in results:
    for got, want in zip(res, expected):
      assert np.all(np.isfinite(got))
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bf16_input_gives_float32_summed_in_float32():
  rng = np.random.default_rng(2)
  b, t, d = 2, 600, 8
  # positive offset so the sums grow to ~600 * 3: summing in bf16 (8 mantissa bits) would be off by ~1%
  h_pos = jnp.asarray(rng.normal(3.0, 1.0, size=(b, t, d)), jnp.bfloat16)
  h_neg = jnp.asarray(rng.normal(3.0, 1.0, size=(b, t, d)), jnp.bfloat16)
  m_pos, m_neg = np.ones((b, t), bool), np.ones((b, t), bool)
  m_neg[:, : t // 3] = False
  out = ches.ches_scores(h_pos, h_neg, m_pos, m_neg)
  out_ln = ches.ches_scores(h_pos, h_neg, m_pos, m_neg, length_normalized=True)
  assert out.dtype == jnp.float32 and out_ln.dtype == jnp.float32
  hp, hn = np.asarray(h_pos, np.float64), np.asarray(h_neg, np.float64)  # exact values of the bf16 inputs
  s_pos, s_neg = (hp * m_pos[..., None]).sum(1), (hn * m_neg[..., None]).sum(1)
  np.testing.assert_allclose(out, (s_pos * (s_neg - s_pos)).sum(-1), rtol=1e-4)
  m_p, m_n = s_pos / t, s_neg / (t - t // 3)
  np.testing.assert_allclose(out_ln, (m_p * (m_n - m_p)).sum(-1), rtol=1e-4)


def test_no_overflow_at_llm_scale():
  # d = 4096, ~1000-token responses, entries up to ~50 (a few massive-activation dims): ||S+||^2 ~ 1e12
  rng = np.random.default_rng(3)
  t, d = 1000, 4096
  base = np.clip(rng.normal(0.0, 15.0, size=d), -50, 50)
  base[:4] = [50.0, -48.0, 45.0, -50.0]
  noise = rng.standard_normal(size=(2, t, d), dtype=np.float32)
  h_pos = (base + 3.0 * noise[0]).astype(np.float32)[None]
  h_neg = (0.8 * base + 3.0 * noise[1]).astype(np.float32)[None]
  m_pos = np.zeros((1, t), bool)
  m_pos[0, 20:] = True  # 980 response tokens
  m_neg = np.ones((1, t), bool)  # 1000 response tokens
  comps = ches.ches_components(jnp.asarray(h_pos, jnp.bfloat16), jnp.asarray(h_neg, jnp.bfloat16), m_pos, m_neg)
  hp = np.asarray(jnp.asarray(h_pos, jnp.bfloat16), np.float64)[0]
  hn = np.asarray(jnp.asarray(h_neg, jnp.bfloat16), np.float64)[0]
  s_pos, s_neg = hp[20:].sum(0), hn.sum(0)
  ref_ches = s_pos @ s_neg - s_pos @ s_pos
  ref_ln = s_pos @ s_neg / (980 * 1000) - s_pos @ s_pos / 980**2
  assert abs(ref_ches) > 1e11 and s_pos @ s_pos > 5e11  # far beyond float16's 65504
  for key in comps:
    assert np.all(np.isfinite(comps[key])), key
  np.testing.assert_allclose(comps["ches"], [ref_ches], rtol=1e-5)  # measured 1e-7
  np.testing.assert_allclose(comps["ln_ches"], [ref_ln], rtol=1e-5)
  np.testing.assert_allclose(comps["chosen_sq_norm"], [s_pos @ s_pos], rtol=1e-5)


def _naive_levenshtein(a, b):
  """Textbook O(nm) dynamic program, scalar loops."""
  prev = list(range(len(b) + 1))
  for i in range(1, len(a) + 1):
    cur = [i] + [0] * len(b)
    for j in range(1, len(b) + 1):
      cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1]))
    prev = cur
  return prev[-1]


def test_edit_distance():
  kitten, sitting = [10, 8, 19, 19, 4, 13], [18, 8, 19, 19, 8, 13, 6]  # 'kitten' / 'sitting' as ids: 3 edits
  assert ches.levenshtein(kitten, sitting) == 3
  assert ches.minus_normalized_edit_distance(kitten, sitting) == pytest.approx(-3 / 7)
  assert ches.minus_normalized_edit_distance([1, 2, 3, 4], [2, 3, 4, 5]) == pytest.approx(-0.5)  # del + ins
  assert ches.minus_normalized_edit_distance([1, 2, 3], [1, 2, 3]) == 0.0
  assert ches.minus_normalized_edit_distance([1, 2, 3], []) == -1.0
  assert ches.minus_normalized_edit_distance([], []) == 0.0
  assert ches.minus_normalized_edit_distance(np.array([5, 6], np.int64), [7, 8, 9]) == pytest.approx(-1.0)
  rng = np.random.default_rng(4)
  pairs = [
      (rng.integers(0, 4, rng.integers(0, 15)).tolist(), rng.integers(0, 4, rng.integers(0, 15)).tolist())
      for _ in range(40)
  ]
  for a, b in pairs:
    assert ches.levenshtein(a, b) == _naive_levenshtein(a, b), (a, b)
  batch = ches.minus_normalized_edit_distance_batch([a for a, _ in pairs], [b for _, b in pairs])
  want = [-_naive_levenshtein(a, b) / max(len(a), len(b), 1) for a, b in pairs]
  assert batch.dtype == np.float32
  np.testing.assert_allclose(batch, want, rtol=1e-6)


def test_last_hidden_inner_product_left_and_right_padding():
  # row 0: chosen last real h = (1, 2), rejected (3, -1) -> 1; row 1: (0, 4) and (2, 5) -> 20
  h_right = np.array([[[5, 5], [1, 2], [0, 0]], [[7, 7], [8, 8], [0, 4]]], np.float32)
  m_right = np.array([[1, 1, 0], [1, 1, 1]], bool)
  h_left = np.array([[[9, 9], [9, 9], [3, -1]], [[9, 9], [1, 1], [2, 5]]], np.float32)
  m_left = np.array([[0, 0, 1], [0, 1, 1]], bool)
  np.testing.assert_allclose(ches.last_hidden_inner_product(h_right, h_left, m_right, m_left), [1.0, 20.0])
  # time-reversed: row 0 last real = (3, -1) (left side now right-padded) and (5, 5) -> 10; row 1 (1,1).(7,7) = 14
  np.testing.assert_allclose(
      ches.last_hidden_inner_product(h_left[:, ::-1], h_right[:, ::-1], m_left[:, ::-1], m_right[:, ::-1]), [10.0, 14.0]
  )
  bf16 = ches.last_hidden_inner_product(jnp.asarray(h_right, jnp.bfloat16), h_left, m_right, m_left)
  assert bf16.dtype == jnp.float32
  np.testing.assert_allclose(bf16, [1.0, 20.0])


def test_bad_inputs():
  h = np.zeros((2, 3, 4), np.float32)
  m = np.ones((2, 3), bool)
  with pytest.raises(ValueError, match=r"hidden_chosen_BTD must be a floating array.*int32"):
    ches.ches_scores(h.astype(np.int32), h, m, m)
  with pytest.raises(ValueError, match=r"hidden_rejected_BTD must have rank 3.*\(2, 3\)"):
    ches.ches_scores(h, h[..., 0], m, m)
  with pytest.raises(ValueError, match=r"must agree on batch B and hidden size D"):
    ches.ches_scores(h, h[..., :3], m, m)
  with pytest.raises(ValueError, match=r"mask_rejected_BT must have shape \(2, 3\).*\(2, 2\)"):
    ches.ches_scores(h, h, m, m[:, :2])
  with pytest.raises(ValueError, match=r"mask_chosen_BT must be a bool or integer mask.*float32"):
    jax.jit(ches.ches_scores)(h, h, m.astype(np.float32), m)  # static check fires under jit too
  with pytest.raises(ValueError, match=r"attention_mask_chosen_BT must have shape"):
    ches.last_hidden_inner_product(h, h, m[:1], m)
  with pytest.raises(ValueError, match=r"ids_a must be a 1-D sequence of integer token ids.*float64"):
    ches.minus_normalized_edit_distance([1.5, 2.0], [1, 2])
  with pytest.raises(ValueError, match=r"ids_b must be a 1-D.*\(2, 2\)"):
    ches.minus_normalized_edit_distance([1], [[1, 2], [3, 4]])
  with pytest.raises(ValueError, match=r"same length, got 2 and 1"):
    ches.minus_normalized_edit_distance_batch([[1], [2]], [[1]])
