"""SLQ / MLQ pure functions: centroid quantization, levels, cluster freezing by loss, on one
layer and on a flat buffer of several (each layer as on its own)."""

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ec2t_jax as ec2t

from ec2t_jax._src import core
from ec2t_jax._src.core import flat as flat_lib
from ec2t_jax._src.core import segments as segments_lib
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


def _official_kmeans(data, num, epochs=10):
  """numpy transcription of ``Kmeans`` / ``kmeans_pre`` (yuhuixu1993/SLQ kmeans.hpp):
  returns the kernel (centroids) and T_vec (the last assignment)."""
  data = np.asarray(data, np.float32)
  n_max = float(np.max(np.abs(data)))
  n_max = 2.0 ** np.floor(np.log(n_max) / np.log(2))
  kernel = np.zeros(num, np.float32)
  for i in range(1, num, 2):
    kernel[i] = n_max / 2 ** ((i - 1) // 2)
    kernel[i + 1] = -kernel[i]
  t_vec = np.zeros(data.size, np.int64)
  for _ in range(epochs):
    for i, x in enumerate(data):
      tmp, score = 0, (x - kernel[0]) ** 2
      for j in range(num):
        if (x - kernel[j]) ** 2 < score:
          tmp, score = j, (x - kernel[j]) ** 2
      t_vec[i] = tmp
    for i in range(1, num):  # the zero centroid stays
      members = data[t_vec == i]
      if members.size:
        kernel[i] = members.sum() / members.size
  return kernel, t_vec


FIXED_5_BIT_LAYER = np.asarray(jax.random.normal(jax.random.key(42), (300,)) * 0.05, np.float32)


def test_official_levels_and_assignment_match_the_transcribed_official_kmeans():
  want_kernel, want_t = _official_kmeans(FIXED_5_BIT_LAYER, 17)
  levels, assignment = slq.official_levels(jnp.asarray(FIXED_5_BIT_LAYER), 17)
  np.testing.assert_allclose(levels, want_kernel, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(assignment, want_t)


def test_official_initial_codebook_is_powers_of_two_with_zero_pinned():
  # One Lloyd iteration from the start on weights that sit on the start exactly.
  w = jnp.array([0.0, 0.5, -0.5, 0.25, -0.25, 0.125, -0.125, 0.7])  # n_max = 0.5
  levels, _ = slq.official_levels(w, 9, iterations=0)
  np.testing.assert_array_equal(levels, [0, 0.5, -0.5, 0.25, -0.25, 0.125, -0.125, 0.0625,
                                         -0.0625])


def test_official_freezing_order_takes_zero_and_the_largest_magnitudes_first():
  tx = ec2t.slq(5, selection=lambda path, leaf: True)
  leaf = tx.init({"w": jnp.asarray(FIXED_5_BIT_LAYER)}).leaves["w"]
  kernel, t_vec = _official_kmeans(FIXED_5_BIT_LAYER, 17)
  # Stage 0: T_vec < 5 (the code's "here 3"): clusters 0, +-n_max, +-n_max/2.
  np.testing.assert_array_equal(np.asarray(leaf.frozen), t_vec < 5)
  np.testing.assert_allclose(np.asarray(leaf.values)[t_vec < 5], kernel[t_vec[t_vec < 5]],
                             rtol=1e-5)
  # The loss order of the earlier reading freezes the smallest magnitudes first instead.
  loss = ec2t.slq(5, freeze_order="loss", init="quantile", selection=lambda path, leaf: True)
  loss_leaf = loss.init({"w": jnp.asarray(FIXED_5_BIT_LAYER)}).leaves["w"]
  frozen_magnitude = np.abs(FIXED_5_BIT_LAYER)[np.asarray(loss_leaf.frozen)].mean()
  official_magnitude = np.abs(FIXED_5_BIT_LAYER)[np.asarray(leaf.frozen)].mean()
  assert official_magnitude > frozen_magnitude


def test_official_cluster_counts_per_stage():
  assert slq.official_cluster_counts(5) == (5, 9, 13, 15, 17)
  assert slq.official_cluster_counts(4) == (3, 5, 7, 9)
  assert slq.official_cluster_counts(2) == (3,)
  spec = ec2t.get_method("slq")
  assert spec.last_phase(spec.options(), 3) == 4  # five stages at 5 bits


@pytest.mark.parametrize("counts, message", [
    ((5, 9, 17, 13), "strictly increasing"),
    ((4, 9, 17), "odd counts"),
    ((5, 9, 15), "must end at 17"),
    ((5, 19), "odd counts"),
    ((), "non-empty"),
])
def test_cluster_counts_the_official_scheme_cannot_partition_are_refused(counts, message):
  with pytest.raises(ValueError, match=message):
    ec2t.slq(5, cluster_counts=counts)


def test_portions_with_the_official_order_are_refused_naming_both():
  with pytest.raises(ValueError, match="portions=.*freeze_order='loss'"):
    ec2t.slq(5, (0.5, 1.0))


# ------------------------------------------------ one flat buffer of several layers

# Three layers of three shapes (48, 16 and 32 weights: the buffer goes by chunks of 16).
_LAYERS = [np.asarray(jax.random.normal(jax.random.key(i), shape), np.float32)
           for i, shape in enumerate([(6, 8), (16,), (4, 2, 4)])]


class _Weights(NamedTuple):  # a one-field state, enough for flat.pack
  latent: jax.Array


def _flat_buffer():
  """The layers' flat-buffer segments, and a function laying per-layer arrays end to end."""
  contexts = [core.LeafContext(f"w{i}", x.shape, jnp.float32, "ternary", None, 1.0)
              for i, x in enumerate(_LAYERS)]
  table = flat_lib.pack([_Weights(jnp.asarray(x)) for x in _LAYERS], contexts,
                        ("element",)).table
  segments = segments_lib.FlatSegments(table)
  end_to_end = lambda xs: jnp.concatenate([jnp.ravel(x) for x in xs]).reshape(
      segments.element_shape)
  return segments, end_to_end


def _pieces(buffer):
  """The per-layer pieces of a flat (element) array, in the layers' shapes."""
  flat, out, offset = np.asarray(buffer).ravel(), [], 0
  for x in _LAYERS:
    out.append(flat[offset:offset + x.size].reshape(x.shape))
    offset += x.size
  return out


_LEVELS = np.array([[0.0, 1.0, -1.0, 0.5, -0.5], [0.0, 0.8, -0.8, 0.3, -0.3],
                    [0.0, 1.5, -1.5, 0.7, -0.7]], np.float32)


def test_reclustering_a_flat_buffer_moves_each_layers_levels_as_on_its_own():
  segments, end_to_end = _flat_buffer()
  free = [np.abs(x) < 1.2 for x in _LAYERS]
  locked = np.array([[False, True, False, False, False]] * 3)
  recluster = jax.jit(slq.recluster_levels, static_argnames=("iterations", "segments"))
  got = recluster(end_to_end(_LAYERS), end_to_end(free), jnp.asarray(_LEVELS),
                  jnp.asarray(locked), iterations=5, segments=segments)
  for i, x in enumerate(_LAYERS):
    want = recluster(jnp.asarray(x), jnp.asarray(free[i]), jnp.asarray(_LEVELS[i]),
                     jnp.asarray(locked[i]), iterations=5)
    np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("order", ["loss", "index"])
def test_freezing_a_flat_buffer_freezes_each_layer_as_on_its_own(order):
  segments, end_to_end = _flat_buffer()
  frozen = [np.abs(x) > 1.5 for x in _LAYERS]
  values = [np.where(f, np.sign(x), 0.0).astype(np.float32) for f, x in zip(frozen, _LAYERS)]
  per_layer = np.array([0.4, 0.6, 0.9], np.float32) if order == "loss" else np.array([1, 3, 5])
  freeze = slq.freeze_clusters if order == "loss" else slq.freeze_by_index
  got = jax.jit(lambda *args: freeze(*args, segments))(
      end_to_end(_LAYERS), end_to_end(frozen), end_to_end(values), jnp.asarray(per_layer),
      jnp.asarray(_LEVELS))
  freeze = jax.jit(freeze)  # one compilation per layer shape, not one per operation
  for i, x in enumerate(_LAYERS):
    want = freeze(jnp.asarray(x), jnp.asarray(frozen[i]), jnp.asarray(values[i]),
                  per_layer[i], jnp.asarray(_LEVELS[i]))
    np.testing.assert_array_equal(_pieces(got.frozen)[i], want.frozen)
    np.testing.assert_array_equal(_pieces(got.values)[i], want.values)
    np.testing.assert_array_equal(got.taken[i], want.taken)
  assert 0 < float(np.mean(np.asarray(got.frozen))) < 1
