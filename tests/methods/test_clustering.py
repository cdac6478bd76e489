"""1-D k-means: hand-checkable cases, empty clusters, jit/non-jit."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ec2t_jax._src.methods._support import clustering


class KMeansTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_two_obvious_groups(self):
    result = self.variant(clustering.kmeans_1d, static_argnums=(1, 2))(
        jnp.array([0., 1., 10., 11.]), 2, 30)
    chex.assert_trees_all_close(result.centroids, jnp.array([0.5, 10.5]))
    np.testing.assert_array_equal(result.assignment, [0, 0, 1, 1])

  @chex.variants(with_jit=True, without_jit=True)
  def test_three_groups_by_hand(self):
    # From init [-1, 0, 1]: assign {-2,-1.5,-1 | 0,0.1,-0.1 | 1.2,3}; means -1.5, 0, 2.1;
    # then 1.2 is nearer 2.1 than 0: stable. Objective 0.5 + 0.02 + 1.62 by hand.
    values = jnp.array([-2., -1.5, -1., 0., 0.1, -0.1, 1.2, 3.])
    result = self.variant(clustering.kmeans_1d, static_argnums=(1, 2))(
        values, 3, 30, jnp.array([-1., 0., 1.]))
    chex.assert_trees_all_close(result.centroids, jnp.array([-1.5, 0.0, 2.1]), atol=1e-6)
    np.testing.assert_array_equal(result.assignment, [0, 0, 0, 1, 1, 1, 2, 2])
    centroids = np.asarray(result.centroids)[np.asarray(result.assignment)]
    assert np.isclose(((np.asarray(values) - centroids) ** 2).sum(), 2.14, atol=1e-5)

  def test_single_lloyd_step_from_given_init(self):
    # One iteration: assign to init [0, 10], then means: (0+2+4)/3 = 2, (9+11)/2 = 10.
    result = clustering.kmeans_1d(jnp.array([0., 2., 4., 9., 11.]), 2, 1, jnp.array([0., 10.]))
    chex.assert_trees_all_close(result.centroids, jnp.array([2.0, 10.0]))

  def test_empty_cluster_keeps_its_centroid(self):
    result = clustering.kmeans_1d(jnp.array([0., 0.1, 0.2]), 2, 5, jnp.array([0.1, 100.]))
    chex.assert_trees_all_close(result.centroids, jnp.array([0.1, 100.]), atol=1e-6)
    np.testing.assert_array_equal(result.assignment, [0, 0, 0])

  def test_lloyd_never_increases_the_objective(self):
    values = jax.random.normal(jax.random.key(0), (500,))
    previous = np.inf
    for iterations in range(6):
      r = clustering.kmeans_1d(values, 5, iterations)
      objective = float(jnp.sum((values - r.centroids[r.assignment]) ** 2))
      assert objective <= previous + 1e-4
      previous = objective

  def test_assignment_is_nearest_of_final_centroids(self):
    values = jax.random.normal(jax.random.key(1), (3, 40))
    r = clustering.kmeans_1d(values, 4, 50)
    chex.assert_shape(r.assignment, (3, 40))
    np.testing.assert_array_equal(r.assignment, clustering.nearest_centroid(values, r.centroids))
    assert np.all(np.diff(np.asarray(r.centroids)) > 0)


def test_bad_k_named():
  with pytest.raises(ValueError, match="k must"):
    clustering.kmeans_1d(jnp.ones(3), 0)
