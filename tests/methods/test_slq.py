"""SLQ / MLQ pure functions: centroid quantization, levels, cluster freezing by loss."""

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ec2t_jax._src.methods import slq


def test_centroids_nearest_zero_becomes_zero_others_powers_of_two():
  got = slq.quantize_centroids(jnp.array([-0.3, 0.01, 0.2, 0.74, 0.76]))
  np.testing.assert_array_equal(got, [-0.25, 0.0, 0.25, 0.5, 1.0])


def test_levels_of_three_obvious_groups():
  w = jnp.array([-1.1, -0.9, -1.0, 0.01, -0.02, 0.0, 0.5, 0.45, 0.55])
  np.testing.assert_array_equal(slq.slq_levels(w, 3), [-1.0, 0.0, 0.5])


class FreezeTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_lowest_loss_cluster_first_then_everything(self):
    # Levels [-1, 0, 0.5]; free losses: {-1.2,-0.8}: 0.04, {0.1,-0.1}: 0.01, {0.3, 0.9}: 0.1.
    w = jnp.array([-1.2, -0.8, 0.1, -0.1, 0.3, 0.9])
    levels = jnp.array([-1.0, 0.0, 0.5])
    freeze = self.variant(slq.freeze_clusters)
    none = jnp.zeros(6, bool)
    r = freeze(w, none, jnp.zeros(6), 0.3, levels)  # target round(1.8) = 2: the zero cluster
    np.testing.assert_array_equal(r.frozen, [0, 0, 1, 1, 0, 0])
    chex.assert_trees_all_close(r.losses, jnp.array([0.04, 0.01, 0.1]), atol=1e-6)
    r = freeze(w, r.frozen, r.values, 0.5, levels)  # target 3: next lowest loss is {-1.2, -0.8}
    np.testing.assert_array_equal(r.frozen, [1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(r.values[:4], [-1.0, -1.0, 0.0, 0.0])
    r = freeze(w, r.frozen, r.values, 1.0, levels)
    assert bool(r.frozen.all())
    np.testing.assert_array_equal(r.values, [-1.0, -1.0, 0.0, 0.0, 0.5, 0.5])

  def test_frozen_weights_keep_their_values_when_latent_moves(self):
    w = jax.random.normal(jax.random.key(0), (40,))
    levels = slq.slq_levels(w, 3)
    r = slq.freeze_clusters(w, jnp.zeros(40, bool), jnp.zeros(40), 0.5, levels)
    moved = w + 5.0  # retraining moved every latent weight
    r2 = slq.freeze_clusters(moved, r.frozen, r.values, 0.9, levels)
    np.testing.assert_array_equal(r2.values[r.frozen], r.values[r.frozen])
    assert set(np.unique(np.asarray(r2.values[r2.frozen]))) <= set(np.asarray(levels).tolist())


def test_cluster_count_is_the_official_codes_two_to_the_b_minus_one_plus_one():
  # The old count 2^b - 1 gave 31 clusters at 5 bits where the official code uses 17.
  assert [slq.num_clusters(b) for b in (2, 3, 4, 5)] == [3, 5, 9, 17]


def test_float_levels_are_the_kmeans_centroids_with_the_one_nearest_zero_at_zero():
  w = jax.random.normal(jax.random.key(3), (200,))
  centroids = np.asarray(slq.clustering.kmeans_1d(w, 5).centroids)
  expected = np.where(np.arange(5) == np.argmin(np.abs(centroids)), 0.0, centroids)
  np.testing.assert_allclose(slq.float_levels(w, 5), expected, rtol=1e-6)
  assert not set(np.asarray(slq.float_levels(w, 5)).tolist()) <= set(
      np.asarray(slq.slq_levels(w, 5)).tolist())  # not rounded to powers of two


def test_recluster_moves_only_unlocked_non_zero_levels_to_the_free_weights_means():
  # Numpy oracle: one Lloyd pass converges here (clusters {-1}, {0.05}, {0.6, 0.8}).
  w = jnp.array([-5.0, -1.0, 0.05, 0.6, 0.8])
  free = jnp.array([False, True, True, True, True])
  levels = jnp.array([-1.5, 0.0, 0.5])
  got = slq.recluster_levels(w, free, levels, jnp.array([False, False, False]))
  np.testing.assert_allclose(got, [-1.0, 0.0, 0.7], rtol=1e-6)
  locked = slq.recluster_levels(w, free, levels, jnp.array([True, False, False]))
  np.testing.assert_allclose(locked, [-1.5, 0.0, 0.7], rtol=1e-6)


def test_advance_reclusters_at_later_stages_and_keeps_at_most_k_values():
  w = jax.random.normal(jax.random.key(4), (300,))
  leaf = slq.slq_advance(slq.slq_init_leaf(w, 5), 0, jnp.array([0.5, 0.8, 1.0]))
  first, locked = np.asarray(leaf.levels), np.asarray(leaf.locked)
  assert locked.any() and not locked.all()
  leaf = leaf._replace(latent=leaf.latent + 0.3)  # retraining moved the free weights
  leaf = slq.slq_advance(leaf, 1, jnp.array([0.5, 0.8, 1.0]))
  moved = np.asarray(leaf.levels) != first
  assert moved.any()  # re-clustered on the moved free weights
  assert not moved[locked].any()  # frozen clusters' levels stay
  leaf = slq.slq_advance(leaf._replace(latent=leaf.latent - 0.2), 2, jnp.array([0.5, 0.8, 1.0]))
  assert bool(leaf.frozen.all())
  assert len(np.unique(np.asarray(leaf.values))) <= 5
  assert set(np.unique(np.asarray(leaf.values)).tolist()) <= set(np.asarray(leaf.levels).tolist())
