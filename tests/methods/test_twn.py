"""TWN's pure functions against the baselines' test vector and brute force."""

import itertools

import chex
import jax.numpy as jnp
import numpy as np
import pytest

import ec2t_jax as ec2t

# baselines.md: mean|W| = 0.328333, Delta = 0.229833, T = [1, 0, 1, -1, 0, 0], alpha = 0.6.
W = jnp.array([0.9, -0.05, 0.3, -0.6, 0.02, 0.1])


def test_layer_threshold_is_seven_tenths_of_mean_magnitude():
  np.testing.assert_allclose(ec2t.twn_threshold(W), 0.7 * 0.3283333, rtol=1e-6)


def test_layer_ternarization_matches_the_test_vector():
  assignment, alpha = ec2t.twn_ternarize(W, "layer")
  chex.assert_trees_all_equal(assignment, jnp.array([1, 0, 1, -1, 0, 0], jnp.int8))
  np.testing.assert_allclose(alpha, 0.6, rtol=1e-6)


def test_filter_threshold_and_scale_are_per_output_column():
  kernel = np.array([[0.9, 0.01], [-0.05, -0.4], [0.3, 0.2]], np.float32)
  assignment, alpha = ec2t.twn_ternarize(jnp.asarray(kernel), "filter")
  delta = 0.75 * np.abs(kernel).mean(axis=0)  # [0.3125, 0.1525]
  expected = np.where(np.abs(kernel) > delta, np.sign(kernel), 0)
  chex.assert_trees_all_equal(assignment, jnp.asarray(expected, jnp.int8))
  np.testing.assert_allclose(alpha, [[0.9, 0.3]], rtol=1e-6)
  chex.assert_shape(alpha, (1, 2))


def test_optimal_threshold_keeps_the_two_largest_of_the_test_vector():
  assignment, alpha = ec2t.twn_ternarize(W, "optimal")
  chex.assert_trees_all_equal(assignment, jnp.array([1, 0, 0, -1, 0, 0], jnp.int8))
  np.testing.assert_allclose(alpha, 0.75, rtol=1e-6)


def _error(w, keep):
  alpha = np.abs(w[keep]).mean() if keep.any() else 0.0
  return np.sum((w - alpha * np.sign(w) * keep) ** 2)


@pytest.mark.parametrize("seed", range(5))
def test_optimal_threshold_matches_brute_force_over_all_keep_sets(seed):
  w = np.random.default_rng(seed).normal(size=9).astype(np.float32)
  delta = float(ec2t.twn_optimal_threshold(jnp.asarray(w)))
  best = min(_error(w, np.array(keep)) for keep in itertools.product([False, True], repeat=9))
  np.testing.assert_allclose(_error(w, np.abs(w) > delta), best, rtol=1e-5)


def test_optimal_threshold_never_splits_tied_magnitudes():
  w = jnp.array([1.0, 1.0, -1.0, 0.1])
  delta = ec2t.twn_optimal_threshold(w)
  chex.assert_trees_all_equal(ec2t.threshold_assign(w, delta),
                              jnp.array([1, 1, -1, 0], jnp.int8))


def test_scale_of_an_all_zero_layer_is_zero():
  assignment, alpha = ec2t.twn_ternarize(jnp.zeros((3, 2)), "layer")
  assert not np.any(np.asarray(assignment)) and float(alpha) == 0.0


class TWNVariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_ternarize_agrees_with_and_without_jit(self):
    kernel = jnp.asarray(np.random.default_rng(0).normal(size=(5, 4)), jnp.float32)
    for mode in ("layer", "filter", "optimal"):
      got = self.variant(lambda w, mode=mode: ec2t.twn_ternarize(w, mode))(kernel)
      chex.assert_trees_all_close(got, ec2t.twn_ternarize(kernel, mode))


@pytest.mark.parametrize("factor", [0.0, -0.7, float("nan")])
def test_non_positive_factor_is_rejected_by_name(factor):
  with pytest.raises(ValueError, match="factor"):
    ec2t.twn_threshold(W, factor)


def test_unknown_threshold_mode_is_rejected_by_name():
  with pytest.raises(ValueError, match="threshold.*'median'"):
    ec2t.twn_ternarize(W, "median")
