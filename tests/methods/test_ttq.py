"""TTQ's pure functions against the baselines' test vector and jax.grad."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
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


def _official_tw_ternarize(x, w_p, w_n, thre):
  """JAX transcription of ``tw_ternarize`` (czhu95/ternarynet ternary.py) with its
  gradient overrides: ``Sign`` -> identity and ``Mul`` -> ``Add`` in
  ``sign(x) * stop_gradient(mask_z)``, then ``* mask_np``."""
  thre_x = jax.lax.stop_gradient(jnp.max(jnp.abs(x)) * thre)
  ones = jnp.ones_like(x)
  mask_p = jnp.where(x > thre_x, ones * w_p, ones)
  mask_np = jnp.where(x < -thre_x, ones * w_n, mask_p)
  mask_z = jnp.where((x < thre_x) & (x > -thre_x), 0.0, 1.0)
  # Forward sign(x) * mask_z; backward identity to x (the two overrides).
  w = x + jax.lax.stop_gradient(jnp.sign(x) * mask_z - x)
  return w * mask_np


def test_default_step_under_sgd_is_the_official_gradient_step():
  rng = np.random.default_rng(11)
  kernel = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
  grad = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
  lr = 0.01
  tx = optax.chain(optax.sgd(lr), ec2t.ttq(selection=lambda path, leaf: True))
  params = {"w": kernel}
  state = tx.init(params)
  params = ec2t.quantized_params(params, state)
  before = ec2t.find_quantizer_state(state).leaves["w"]
  # The official forward at the same state reproduces the params ...
  np.testing.assert_allclose(_official_tw_ternarize(kernel, before.w_p, before.w_n, 0.05),
                             params["w"], rtol=1e-6)
  # ... and one SGD step moves the latent weights and both scales by -lr * its gradients.
  g_x, g_p, g_n = jax.grad(
      lambda x, p, n: jnp.sum(grad * _official_tw_ternarize(x, p, n, 0.05)),
      argnums=(0, 1, 2))(kernel, before.w_p, before.w_n)
  _, state = tx.update({"w": grad}, state, params)
  after = ec2t.find_quantizer_state(state).leaves["w"]
  np.testing.assert_allclose(after.latent, kernel - lr * g_x, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(after.w_p, before.w_p - lr * g_p, rtol=1e-5)
  np.testing.assert_allclose(after.w_n, before.w_n - lr * g_n, rtol=1e-5)


def test_official_scale_gradients_equal_jax_grad_of_the_official_forward():
  rng = np.random.default_rng(12)
  x = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
  w_p, w_n = jnp.float32(0.7), jnp.float32(1.3)
  a = ec2t.ttq_assign(x, ec2t.ttq_threshold(x, 0.05))
  latent, grad_n, grad_p = ec2t.ttq_gradients(g, a, w_n, w_p)
  oracle = jax.grad(lambda x, p, n: jnp.sum(g * _official_tw_ternarize(x, p, n, 0.05)),
                    argnums=(0, 1, 2))(x, w_p, w_n)
  np.testing.assert_allclose(latent, oracle[0], rtol=1e-6)
  np.testing.assert_allclose(grad_p, oracle[1], rtol=1e-5)
  np.testing.assert_allclose(grad_n, oracle[2], rtol=1e-5)


def test_unknown_scale_step_is_refused_by_name():
  with pytest.raises(ValueError, match="scale_step"):
    ec2t.ttq(scale_step="median")
