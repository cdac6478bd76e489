"""Properties of EC2T that must hold for any input (hypothesis)."""

import flax.linen as nn
from hypothesis import given, settings, strategies as st
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax

import ec2t_jax as ec2t

_weights = hnp.arrays(np.float32, st.integers(4, 200),
                      elements=st.floats(-3, 3, width=32))
_positive = st.floats(1e-3, 2.0)


@settings(max_examples=25, deadline=None)
@given(_weights, _positive, _positive, st.floats(0, 1), st.floats(0, 1))
def test_sparsity_never_decreases_as_gamma_grows(w, w_n, w_p, g1, g2):
  low, high = sorted((g1, g2))
  zeros = lambda g: int(jnp.sum(ec2t.entropy_constrained_assign(
      w, w_n, w_p, gamma=g)[0] == 0))
  assert zeros(low) <= zeros(high)


@settings(max_examples=25, deadline=None)
@given(_weights, _positive, _positive, st.floats(0, 1))
def test_assignment_is_the_argmin_of_the_cost(w, w_n, w_p, gamma):
  a, lam = ec2t.entropy_constrained_assign(w, w_n, w_p, gamma=gamma)
  info = ec2t.information_content(ec2t.cluster_probabilities(
      ec2t.nearest_centroid_assign(w, w_n, w_p)))
  values = np.array([-w_n, 0.0, w_p])
  costs = ((w[:, None].astype(np.float64) - values) ** 2
           + float(lam) * np.asarray(info, np.float64))
  chosen = costs[np.arange(len(w)), np.asarray(a) + 1]
  np.testing.assert_array_less(chosen, costs.min(axis=1) + 1e-5)


class _Tiny(nn.Module):

  @nn.compact
  def __call__(self, x):
    for width in (6, 5, 4, 3):
      x = nn.tanh(nn.Dense(width)(x))
    return x


# Jitted: one compile, not one per op.
_PARAMS = jax.jit(_Tiny().init)(jax.random.key(0), jnp.ones((1, 4)))["params"]


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0, 1), st.floats(1e-4, 1.0),
       st.integers(1, 4))
def test_every_update_lands_on_three_values_above_the_floor(seed, gamma, scale,
                                                            steps):
  tx = optax.chain(optax.sgd(scale),
                   ec2t.ternarize_transform(gamma=gamma, init_scale=0.3))
  state = tx.init(_PARAMS)
  params = ec2t.quantized_params(_PARAMS, state)
  keys = jax.random.split(jax.random.key(seed), steps)
  for key in keys:
    grads = jax.tree.map(lambda p, k=key: jax.random.normal(k, p.shape), params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  core = ec2t.find_quantizer_state(state)
  exact = ec2t.quantized_params(params, state)
  for name in ("Dense_1", "Dense_2"):
    kernel = np.asarray(params[name]["kernel"])
    np.testing.assert_array_equal(kernel, exact[name]["kernel"])
    w_n, w_p = float(core.field("w_n")[name]["kernel"]), float(core.field("w_p")[name]["kernel"])
    assert len(set(kernel.ravel().tolist()) - {0.0}) <= 2
    # Params hold the centroids rounded to a grid of 2^-22 * 2^ceil(log2 max).
    grid = 2.0 ** -21 * max(w_n, w_p)
    np.testing.assert_allclose(kernel.max(initial=w_p), w_p, rtol=0, atol=grid)
    np.testing.assert_allclose(kernel.min(initial=-w_n), -w_n, rtol=0, atol=grid)
    floor = 0.675 * np.std(np.asarray(core.latent[name]["kernel"]), ddof=1)
    assert min(w_n, w_p) >= floor * (1 - 1e-6)
