"""monitor: Definition-1 share, top-k gainers and overlap, unembedding metrics, displacement warning."""

import numpy as np
import pytest

from displacement_jax import displacement as monitor


def test_logprob_change_stats_hand_computed():
  pos, pos_ref = np.array([-1.0, -2.0, -3.0, -4.0]), np.array([-1.5, -1.0, -3.0, -3.0])
  neg, neg_ref = np.array([-5.0, -6.0, -7.0, -8.0]), np.array([-4.0, -4.0, -4.0, -4.0])
  out = monitor.logprob_change_stats(pos, neg, pos_ref, neg_ref)
  # preferred changes: +0.5, -1, 0, -1 -> mean -0.375; fell (< 0) in 2 of 4 (0 is not a fall).
  assert out["monitor/preferred_logprob_change"] == pytest.approx(-0.375)
  assert out["monitor/dispreferred_logprob_change"] == pytest.approx(-2.5)
  assert out["monitor/margin_change"] == pytest.approx(-0.375 + 2.5)
  assert out["monitor/share_preferred_fell"] == pytest.approx(0.5)
  with pytest.raises(ValueError, match="equal 1-D"):
    monitor.logprob_change_stats(pos, neg[:3], pos_ref, neg_ref)


def test_top_k_gainers_and_overlap():
  ref = np.array([0.1, 0.2, 0.3, 0.1, 0.2, 0.1])
  now = np.array([0.05, 0.25, 0.1, 0.3, 0.2, 0.1])  # gains: -.05 .05 -.2 .2 0 0
  np.testing.assert_array_equal(monitor.top_k_gainers(now, ref, 3), [3, 1, 4])
  np.testing.assert_array_equal(monitor.top_k_gainers(now, ref, 2, exclude=[3]), [1, 4])
  assert monitor.top_k_overlap([3, 1, 4], [1, 5, 3]) == pytest.approx(2 / 3)
  assert monitor.top_k_overlap([0], [0]) == 1.0
  with pytest.raises(ValueError, match="top_k"):
    monitor.top_k_gainers(now, ref, 7)


def test_unembedding_metrics_hand_computed():
  W = np.zeros((4, 3))
  W[1] = [3.0, 0.0, 0.0]  # W+
  W[2] = [1.0, 2.0, 0.0]  # W-
  out = monitor.unembedding_metrics(W, 1, 2)
  assert out["monitor/w_pos_norm"] == pytest.approx(3.0)
  assert out["monitor/w_neg_norm"] == pytest.approx(np.sqrt(5.0))
  assert out["monitor/w_pos_dot_w_neg"] == pytest.approx(3.0)
  # W+ - W- = (2, -2, 0): projection on W+ direction = 2, orthogonal part (0, -2, 0) -> norm 2.
  assert out["monitor/w_diff_proj_on_pos"] == pytest.approx(2.0)
  assert out["monitor/w_diff_orth_norm"] == pytest.approx(2.0)
  with pytest.raises(ValueError, match="y_neg=9"):
    monitor.unembedding_metrics(W, 1, 9)


def test_predicted_gainers_follow_theorem_2():
  # Theorem 2: for z not in {y+, y-}, d/dt ln pi(z) = -l' (<W_z, W+ - W-> + c) with c shared by all z,
  # so the predicted ranking is by <W_z, W+ - W->.
  rng = np.random.default_rng(0)
  W = rng.normal(size=(12, 5)).astype(np.float32)
  h = rng.normal(size=(1, 5)).astype(np.float32)
  logits = W @ h[0]
  prob = np.exp(logits - logits.max())
  prob /= prob.sum()
  score = W @ (W[3] - W[7])
  score[[3, 7]] = -np.inf
  expected = np.argsort(-score)[:4]
  got = monitor.predicted_gainers(W, h, np.array([3]), np.array([7]), prob[None], 4)
  np.testing.assert_array_equal(got, expected)
  # several samples with the same pair: averaged rates give the same ranking.
  got2 = monitor.predicted_gainers(
      W, np.repeat(h, 2, 0), np.array([3, 3]), np.array([7, 7]), np.repeat(prob[None], 2, 0), 4
  )
  np.testing.assert_array_equal(got2, expected)


def test_single_token_report():
  ref = np.array([0.25, 0.25, 0.25, 0.25])
  now = np.array([[0.1, 0.2, 0.3, 0.4], [0.1, 0.4, 0.1, 0.4]])  # mean gain: -.15 .05 -.05 .15
  out = monitor.single_token_report(
      now, ref, np.array([1]), np.array([3]), np.array([0]), 1, token_names=["a", "b", "c", "d"]
  )
  assert out["monitor/top_k_gainers"] == [1]  # y+ = 3 and y- = 0 are excluded
  assert out["monitor/top_k_gainers_tokens"] == ["b"]
  assert out["monitor/top_k_overlap"] == 1.0


def test_displacement_warning():
  assert monitor.displacement_warning(5, 0.5, -0.1, None, None) is None
  msg = monitor.displacement_warning(5, 0.5, -0.1, 0.69, None)
  assert "step 5" in msg and "preferred log-prob fell" in msg
  assert monitor.displacement_warning(5, 0.5, 0.2, 0.69, 0.1) is None  # preferred rose
  assert monitor.displacement_warning(5, 0.7, -0.3, 0.69, -0.1) is None  # loss rose
  assert monitor.displacement_warning(6, 0.6, -0.3, 0.69, -0.1) is not None
  # y+ 6 nats above its reference wiggling down by 0.005 nats: no displacement, no warning.
  assert monitor.displacement_warning(7, 0.3, 5.995, 0.4, 6.0) is None
  # Within the threshold below the reference (float-noise wiggles around 0): no warning.
  assert monitor.displacement_warning(7, 0.3, -0.005, 0.4, 0.0) is None
  assert monitor.displacement_warning(7, 0.3, -0.005, 0.4, 0.0, nats=0.001) is not None


def test_share_preferred_fell_ignores_float_noise():
  ref = np.array([-300.0, -300.0, -0.5, -0.5])
  # -1e-3 nats at |ref| = 300 is below the 3e-3 noise floor; -1e-2 is a real fall; at |ref| < 1 the floor is 1e-5.
  change = np.array([-1e-3, -1e-2, -5e-6, -2e-5])
  assert monitor.share_preferred_fell(change, ref) == pytest.approx(0.5)
  np.testing.assert_array_equal(monitor.fell(change, ref), [False, True, False, True])
  assert monitor.share_preferred_fell(np.zeros(4), ref) == 0.0


def test_format_line():
  line = monitor.format_line(
      4, {"monitor/loss": 0.5, "monitor/preferred_logprob_change": -0.25, "monitor/share_preferred_fell": 0.75}
  )
  assert line == "monitor step 4: loss 0.5000 | dlogp(y+) -0.2500 | share y+ fell 0.75"


def test_no_displacement_warning_on_a_loss_that_did_not_fall():
  """Chosen == rejected rows: the loss is log 2 at every eval, up to float noise; that is no fall (it was warned as
  'loss fell 0.6931 -> 0.6931')."""
  assert monitor.displacement_warning(4, 0.69314712, -0.3, 0.69314718, -0.1) is None
  assert monitor.displacement_warning(4, 0.6930, -0.3, 0.69314718, -0.1) is not None
