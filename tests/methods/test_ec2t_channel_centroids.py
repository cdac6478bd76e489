"""EC2T with one centroid pair per output channel (``centroids="channel"``) against a numpy
re-statement: initialisation, floor, lambda_max (by bisection), assignment, the chain step,
the export round trip and the summary."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ec2t_jax as ec2t
from ec2t_jax._src.methods.ec2t import chain as ec2t_chain
from ec2t_jax._src.methods.ec2t import ternary

# Columns = output channels with very different scales (the case per-channel centroids serve).
W = (np.random.default_rng(0).normal(size=(12, 5)) * np.array([0.05, 0.2, 1.0, 0.5, 2.0])
     ).astype(np.float32)
S = 0.3


def np_initial(w, s):
  return s * np.abs(w.min(0, keepdims=True)), s * np.abs(w.max(0, keepdims=True))


def np_floor(w, w_n, w_p, factor=0.675):
  floor = factor * w.std(0, ddof=1, keepdims=True)
  return np.maximum(w_n, floor), np.maximum(w_p, floor)


def np_costs(w, w_n, w_p, lam, info):
  return np.stack([(w + w_n) ** 2 + lam * info[0], w ** 2 + lam * info[1],
                   (w - w_p) ** 2 + lam * info[2]])  # (n, 0, p)


def np_assign(w, w_n, w_p, lam, info):
  """argmin over (0, n, p) (ties to zero, then n), as the library's "zero" rule."""
  c = np_costs(w, w_n, w_p, lam, info)
  order = np.stack([c[1], c[0], c[2]])
  return np.array([0, -1, 1], np.int8)[order.argmin(0)]


def np_information(a, zero_floor=0.5):
  p = np.maximum([(a == -1).sum(), (a == 0).sum(), (a == 1).sum()], 1) / a.size
  if p[1] < zero_floor:
    rest = (1 - zero_floor) / (p[0] + p[2])
    p = np.array([p[0] * rest, zero_floor, p[2] * rest])
  return -np.log2(p)


def bisect_empty_side(w, w_n, w_p, info, side):
  """Smallest lambda at which no weight is assigned to ``side`` (-1 or 1), by bisection."""
  low, high = 0.0, 1.0
  while (np_assign(w, w_n, w_p, high, info) == side).any():
    high *= 2
  for _ in range(60):
    mid = (low + high) / 2
    low, high = (mid, high) if (np_assign(w, w_n, w_p, mid, info) == side).any() else (low, mid)
  return high


def test_initial_centroids_are_each_channels_scaled_extremes():
  w_n, w_p = ec2t.initial_centroids(W, S, channel_axis=-1)
  chex.assert_shape((w_n, w_p), (1, 5))
  for got, expected in zip((w_n, w_p), np_initial(W, S)):
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_the_floor_is_each_channels_std():
  w_n, w_p = np_initial(W, S)
  got = ec2t.centroid_floor(W, w_n, w_p, 0.675, channel_axis=1)
  for g, e in zip(got, np_floor(W, w_n, w_p)):
    np.testing.assert_allclose(g, e, rtol=1e-5)


def test_lambda_max_is_where_the_first_side_of_the_layer_empties():
  w_n, w_p = np_floor(W, *np_initial(W, 0.5))
  info = np_information(np_assign(W, w_n, w_p, 0.0, np.zeros(3)))
  expected = min(bisect_empty_side(W, w_n, w_p, info, -1), bisect_empty_side(W, w_n, w_p, info, 1))
  np.testing.assert_allclose(ec2t.lambda_max(W, w_n, w_p, info, channel_axis=-1), expected,
                             rtol=1e-4)


def test_one_channel_gives_the_per_layer_lambda_max():
  w = W[:, 2:3]
  info = jnp.array([2.0, 1.0, 1.5])
  np.testing.assert_allclose(ec2t.lambda_max(w, 0.3, 0.4, info, channel_axis=-1),
                             ec2t.lambda_max(w, 0.3, 0.4, info), rtol=1e-6)


@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
def test_assignment_uses_channel_centroids_and_the_layers_information(gamma):
  w_n, w_p = np_floor(W, *np_initial(W, S))
  info = np_information(np_assign(W, w_n, w_p, 0.0, np.zeros(3)))
  lam = gamma * 0.8 * min(bisect_empty_side(W, w_n, w_p, info, s) for s in (-1, 1))
  a, got_lam = ec2t.entropy_constrained_assign(W, w_n, w_p, gamma=gamma, size_decay=0.8,
                                               channel_axis=-1)
  np.testing.assert_allclose(got_lam, lam, rtol=1e-4, atol=1e-9)
  np.testing.assert_array_equal(a, np_assign(W, w_n, w_p, float(got_lam), info))


def test_cluster_means_per_channel_with_fallbacks():
  a = np.array([[1, 0, -1], [1, -1, 0], [0, -1, 0]], np.int8)
  v = np.arange(9, dtype=np.float32).reshape(3, 3)
  mean_n, mean_p = ec2t_chain.cluster_means(v, a, np.full((1, 3), -7.0), np.full((1, 3), 7.0),
                                            channel_axis=-1)
  np.testing.assert_allclose(mean_n, [[-7.0, 5.5, 2.0]])
  np.testing.assert_allclose(mean_p, [[1.5, 7.0, 7.0]])


def _chain(gamma=0.2, **kw):
  return optax.chain(optax.sgd(0.05), ec2t.ternarize_transform(
      gamma=gamma, centroids="channel", selection=lambda path, leaf: leaf.ndim == 2, **kw))


def test_one_chain_step_matches_the_numpy_restatement():
  params = {"k": jnp.asarray(W)}
  grads = {"k": jnp.asarray(np.random.default_rng(1).normal(size=W.shape), jnp.float32)}
  tx = _chain()
  state = tx.init(params)
  params = ec2t.quantized_params(params, state)
  before = ec2t.find_quantizer_state(state).leaves["k"]
  updates, state = tx.update(grads, state, params)
  after = ec2t.find_quantizer_state(state).leaves["k"]
  u = -0.05 * np.asarray(grads["k"])
  a0 = np.asarray(before.assignment)
  latent = np.asarray(before.latent) + u
  mean = lambda mask: (np.where(mask, u, 0).sum(0, keepdims=True)
                       / np.maximum(mask.sum(0, keepdims=True), 1))
  w_n = np.asarray(before.w_n) - 0.1 * mean(a0 < 0)
  w_p = np.asarray(before.w_p) + 0.1 * mean(a0 > 0)
  w_n, w_p = np_floor(latent, w_n, w_p)
  # Distortion in units of each channel's spread r_c = std(W_c) / std(W).
  r = latent.std(0, ddof=1, keepdims=True) / latent.std(ddof=1)
  scaled = (latent / r, w_n / r, w_p / r)
  info = np_information(np_assign(*scaled, 0.0, np.zeros(3)))
  lam = 0.2 * ((1.0 + 0.05) / 1.05) * min(bisect_empty_side(*scaled, info, s) for s in (-1, 1))
  np.testing.assert_allclose(after.w_n, w_n, rtol=1e-5)
  np.testing.assert_allclose(after.w_p, w_p, rtol=1e-5)
  np.testing.assert_allclose(after.lam, lam, rtol=1e-4)
  np.testing.assert_array_equal(after.assignment, np_assign(*scaled, float(after.lam), info))
  # ... which keeps every channel alive, where the layer's lambda in absolute units need not.
  assert (np.asarray(after.assignment) != 0).any(axis=0).all()
  new = np.asarray(optax.apply_updates(params, updates)["k"])
  np.testing.assert_allclose(new, np.where(after.assignment > 0, w_p,
                                           np.where(after.assignment < 0, -w_n, 0)), rtol=1e-6)


@pytest.fixture(scope="module")
def trained():
  rng = np.random.default_rng(2)
  params = {"a": {"kernel": jnp.asarray(W)}, "b": {"kernel": jnp.asarray(W[:, ::-1].copy())},
            "stack": {"kernel": jnp.asarray(rng.normal(size=(3, 12, 5)), jnp.float32)}}
  tx = optax.chain(optax.sgd(0.05), ec2t.ternarize_transform(
      gamma=0.2, centroids="channel",
      selection=[ec2t.Rule("a/kernel"), ec2t.Rule("b/kernel"),
                 ec2t.Rule("stack/kernel", stack_axes=(0,))]))
  state = tx.init(params)
  params = ec2t.quantized_params(params, state)
  update = jax.jit(tx.update)  # one compilation for the three steps (eager: ~3x slower)
  for step in range(3):
    grads = jax.tree.map(lambda x, s=step: jnp.sin(x * (s + 1)), params)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def test_every_column_holds_its_own_three_values(trained):
  params, _ = trained
  kernel = np.asarray(params["a"]["kernel"])
  assert all(len(np.unique(kernel[:, c])) <= 3 for c in range(5))
  assert len(np.unique(kernel)) > 3  # the channels' centroids differ


def test_export_round_trips_channel_centroids_bitwise(trained):
  params, _ = trained
  back = ec2t.export.decode(ec2t.export.encode(params))
  for got, expected in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(got).view(np.uint32),
                                  np.asarray(expected).view(np.uint32))


def test_summary_counts_the_assignments_bits_not_the_channel_values(trained):
  params, state = trained
  rows = {row.path: row for row in ec2t.summary(state).layers}
  a = np.sign(np.asarray(params["a"]["kernel"]))  # the centroids are positive
  p = np.array([(a == v).mean() for v in (-1, 0, 1)])
  p = p[p > 0]
  np.testing.assert_allclose(rows["a/kernel"].entropy, -(p * np.log2(p)).sum(), rtol=1e-5)
  assert rows["a/kernel"].levels <= 3 and "stack/kernel[2]" in rows


def test_bad_centroids_and_vectors_are_refused_by_name():
  with pytest.raises(ValueError, match="centroids"):
    ec2t.ternarize_transform(gamma=0.1, centroids="row")
  tx = ec2t.ternarize_transform(gamma=0.1, centroids="channel",
                                selection=lambda path, leaf: True)
  with pytest.raises(ValueError, match="centroids='channel'.*'v'"):
    tx.init({"v": jnp.ones(8)})


def test_the_registry_grid_is_per_filter_with_channel_centroids():
  spec = ec2t.get_method("ec2t")
  assert spec.grid_for(centroids="channel").per_filter
  assert not spec.grid_for().per_filter
