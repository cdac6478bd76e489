"""One-dimensional k-means (Lloyd's algorithm) for clustering a layer's weights.

Implemented here as a few jit-able Lloyd iterations rather than taken from a
library: the data are scalars, ``k`` is small (3 for ternary, ``2^b - 1``
for ``b`` bits) and the call runs inside optax ``init`` under ``jit``/``vmap``,
where scikit-learn (host-only, float64, random restarts) cannot go. In one
dimension the clusters are intervals, so an assignment is "nearest centroid"
and an update is a segment mean; both are ``O(n k)`` per iteration.

Initialisation is deterministic: centroids at the quantiles
``(i + 1/2) / k`` of the weights, which puts the middle centroid of an odd
``k`` near the median (zero for symmetric weights). An empty cluster keeps its
centroid. Iterations stop early when the assignment no longer changes.

Example:
  >>> import jax.numpy as jnp
  >>> from ec2t_jax import kmeans_1d
  >>> centroids, assignment = kmeans_1d(jnp.array([0., 1., 10., 11.]), 2)
  >>> centroids
  Array([ 0.5, 10.5], dtype=float32)
  >>> assignment
  Array([0, 0, 1, 1], dtype=int32)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class KMeansResult(NamedTuple):
  """Centroids (sorted ascending) and each value's cluster index."""
  centroids: jax.Array
  assignment: jax.Array


def nearest_centroid(values: jax.Array, centroids: jax.Array) -> jax.Array:
  """Index of the nearest centroid for each value (ties: the lower index)."""
  distance = jnp.abs(values.reshape(-1, 1) - centroids.reshape(1, -1))
  return jnp.argmin(distance, axis=1).astype(jnp.int32).reshape(values.shape)


def cluster_means(values: jax.Array, assignment: jax.Array, centroids: jax.Array,
                  mask: jax.Array | None = None) -> jax.Array:
  """Mean of each cluster's values (those where ``mask``); an empty cluster keeps its centroid."""
  k = centroids.shape[0]
  flat = values.reshape(-1).astype(jnp.float32)
  weight = jnp.ones_like(flat) if mask is None else mask.reshape(-1).astype(jnp.float32)
  index = assignment.reshape(-1)
  sums = jax.ops.segment_sum(flat * weight, index, num_segments=k)
  counts = jax.ops.segment_sum(weight, index, num_segments=k)
  return jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), centroids).astype(centroids.dtype)


def quantile_init(values: jax.Array, k: int, mask: jax.Array | None = None) -> jax.Array:
  """Initial centroids at the ``(i + 1/2) / k`` quantiles of ``values`` (those where ``mask``).

  The quantile is the order statistic ``floor((i + 1/2) m / k)`` of the ``m``
  chosen values (no interpolation). With no value chosen, all centroids are 0.
  """
  flat = values.reshape(-1).astype(jnp.float32)
  if mask is None:
    mask = jnp.ones(flat.shape, bool)
  mask = mask.reshape(-1)
  ordered = jnp.sort(jnp.where(mask, flat, jnp.inf))
  m = jnp.sum(mask)
  index = jnp.floor((jnp.arange(k) + 0.5) * m / k).astype(jnp.int32)
  return jnp.where(m > 0, ordered[jnp.clip(index, 0, flat.size - 1)], 0.0)


def kmeans_1d(values: jax.Array, k: int, iterations: int = 30,
              init: jax.Array | None = None, mask: jax.Array | None = None) -> KMeansResult:
  """Clusters scalars into ``k`` groups by Lloyd iterations.

  Minimises ``sum_i (v_i - c_{a_i})^2`` locally: alternately assign each
  value to its nearest centroid and move each centroid to its cluster's mean.

  Args:
    values: any shape; flattened.
    k: number of clusters (static, ``>= 1``).
    iterations: maximum number of Lloyd iterations (static).
    init: initial centroids, shape ``(k,)``; default :func:`quantile_init`.
    mask: cluster only the values where ``mask`` is True (the others are
      still assigned to their nearest centroid but do not move centroids).

  Returns:
    A :class:`KMeansResult`: float32 centroids sorted ascending and an int32
    assignment with the shape of ``values``.
  """
  if k < 1:
    raise ValueError(f"k must be at least 1, got {k}")
  if iterations < 0:
    raise ValueError(f"iterations must be non-negative, got {iterations}")
  values = jnp.asarray(values)
  centroids = jnp.sort(quantile_init(values, k, mask) if init is None
                       else jnp.asarray(init, jnp.float32).reshape(k))
  flat = values.reshape(-1).astype(jnp.float32)

  def step(carry):
    i, centroids, assignment, _ = carry
    new_centroids = cluster_means(flat, assignment, centroids, mask)
    new_assignment = nearest_centroid(flat, new_centroids)
    moved = new_assignment != assignment
    changed = jnp.any(moved if mask is None else moved & mask.reshape(-1))
    return i + 1, new_centroids, new_assignment, changed

  def keep_going(carry):
    i, _, _, changed = carry
    return (i < iterations) & changed

  assignment = nearest_centroid(flat, centroids)
  _, centroids, assignment, _ = jax.lax.while_loop(
      keep_going, step, (jnp.int32(0), centroids, assignment, jnp.bool_(True)))
  # Means of sorted intervals stay sorted; sort anyway for safety and remap.
  order = jnp.argsort(centroids)
  inverse = jnp.zeros((k,), jnp.int32).at[order].set(jnp.arange(k, dtype=jnp.int32))
  return KMeansResult(centroids[order], inverse[assignment].reshape(values.shape))
