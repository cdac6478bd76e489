"""TTQ's pure functions against the baselines' test vector and jax.grad."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ec2t_jax as ec2t

# baselines.md (t = 0.05): Delta = 0.045, clusters [+, -, +, -, 0, +],
# latent-gradient multipliers [W_p, W_n, W_p, W_n, 1, W_p].
W = jnp.array([0.9, -0.05, 0.3, -0.6, 0.02, 0.1])
W_N, W_P = 0.7, 1.3


def test_threshold_is_a_fraction_of_the_largest_magnitude():
  np.testing.assert_allclose(ec2t.ttq_threshold(W, 0.05), 0.045, rtol=1e-6)


def test_clusters_match_the_test_vector():
  chex.assert_trees_all_equal(ec2t.ttq_assign(W, ec2t.ttq_threshold(W)),
                              jnp.array([1, -1, 1, -1, 0, 1], jnp.int8))


def test_latent_gradient_multipliers_match_the_test_vector():
  a = ec2t.ttq_assign(W, 0.045)
  latent, _, _ = ec2t.ttq_gradients(jnp.ones(6), a, W_N, W_P)
  np.testing.assert_allclose(latent, [W_P, W_N, W_P, W_N, 1.0, W_P], rtol=1e-6)


def _ternary(a, w_n, w_p):
  return jnp.where(a > 0, w_p, jnp.where(a < 0, -w_n, 0.0))


def test_scale_gradients_equal_jax_grad_of_the_forward():
  a = ec2t.ttq_assign(W, 0.045)
  g = jnp.array([0.3, -1.0, 0.5, 2.0, 7.0, -0.25])
  loss = lambda w_n, w_p: jnp.sum(g * _ternary(a, w_n, w_p))
  oracle_n, oracle_p = jax.grad(loss, argnums=(0, 1))(W_N, W_P)
  _, grad_n, grad_p = ec2t.ttq_gradients(g, a, W_N, W_P)
  np.testing.assert_allclose([grad_n, grad_p], [oracle_n, oracle_p], rtol=1e-6)
  np.testing.assert_allclose(grad_n, -2.0 - (-1.0), rtol=1e-6)  # -sum over n, exact sign


def test_latent_gradient_equals_jax_grad_of_the_scaled_straight_through_forward():
  delta = 0.045
  g = jnp.array([0.3, -1.0, 0.5, 2.0, 7.0, -0.25])

  def forward(w):
    a = ec2t.ttq_assign(w, delta)
    scale = jax.lax.stop_gradient(jnp.where(a > 0, W_P, jnp.where(a < 0, W_N, 1.0)))
    return jax.lax.stop_gradient(_ternary(a, W_N, W_P)) + scale * (w - jax.lax.stop_gradient(w))

  oracle = jax.grad(lambda w: jnp.sum(g * forward(w)))(W)
  latent, _, _ = ec2t.ttq_gradients(g, ec2t.ttq_assign(W, delta), W_N, W_P)
  np.testing.assert_allclose(latent, oracle, rtol=1e-6)


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.9])
def test_sparsity_threshold_zeroes_the_requested_fraction(sparsity):
  w = jnp.asarray(np.random.default_rng(1).normal(size=(10, 10)), jnp.float32)
  a = ec2t.ttq_assign(w, ec2t.ttq_sparsity_threshold(w, sparsity))
  assert int(np.sum(np.asarray(a) == 0)) == int(np.floor(sparsity * 100))


def test_sparsity_threshold_of_the_test_vector():
  np.testing.assert_allclose(ec2t.ttq_sparsity_threshold(W, 0.5), 0.1, rtol=1e-6)


class TTQVariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_gradients_agree_with_and_without_jit(self):
    g = jnp.linspace(-1.0, 1.0, 6)
    fn = lambda w, g: ec2t.ttq_gradients(g, ec2t.ttq_assign(w, ec2t.ttq_threshold(w)), W_N, W_P)
    chex.assert_trees_all_close(self.variant(fn)(W, g), fn(W, g))

  @chex.variants(with_jit=True, without_jit=True)
  def test_sparsity_threshold_agrees_with_and_without_jit(self):
    fn = lambda w: ec2t.ttq_sparsity_threshold(w, 0.5)
    chex.assert_trees_all_close(self.variant(fn)(W), fn(W))


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")])
def test_threshold_outside_unit_interval_is_rejected_by_name(value):
  with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\] \(finite\), got"):
    ec2t.ttq_threshold(W, value)


@pytest.mark.parametrize("value", [-0.5, 1.01])
def test_sparsity_outside_unit_interval_is_rejected_by_name(value):
  with pytest.raises(ValueError, match="sparsity"):
    ec2t.ttq_sparsity_threshold(W, value)
