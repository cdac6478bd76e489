"""BitNet b1.58: absmean ternarization, the straight-through step, 8-bit activations."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ec2t_jax as ec2t

# mean|W| = 1.97 / 6 = 0.328333; W / g = [2.74, -0.15, 0.91, -1.83, 0.06, 0.30]
W = jnp.array([0.9, -0.05, 0.3, -0.6, 0.02, 0.1])
ALL = lambda path, leaf: True


def test_absmean_ternarization_matches_the_hand_computed_vector():
  assignment, scale = ec2t.absmean_ternarize(W)
  chex.assert_trees_all_equal(assignment, jnp.array([1, 0, 1, -1, 0, 0], jnp.int8))
  np.testing.assert_allclose(scale, 1.97 / 6, rtol=1e-6)


def test_absmean_ternarization_equals_a_numpy_restatement():
  w = np.random.default_rng(0).normal(size=(16, 24)).astype(np.float32)
  assignment, scale = ec2t.absmean_ternarize(jnp.asarray(w))
  g = np.abs(w).mean()
  np.testing.assert_allclose(scale, g, rtol=1e-6)
  np.testing.assert_array_equal(assignment, np.clip(np.round(w / g), -1, 1))


def test_a_weight_at_exactly_half_the_scale_rounds_to_zero():
  # g = mean|[1.5, 0.25, -0.25, 0]| = 0.5, so W / g = [3, 0.5, -0.5, 0] (half to even: 0).
  assignment, scale = ec2t.absmean_ternarize(jnp.array([1.5, 0.25, -0.25, 0.0]))
  np.testing.assert_allclose(scale, 0.5)
  chex.assert_trees_all_equal(assignment, jnp.array([1, 0, 0, 0], jnp.int8))


def test_an_all_zero_layer_keeps_the_epsilon_scale_and_stays_zero():
  assignment, scale = ec2t.absmean_ternarize(jnp.zeros((3, 4)))
  np.testing.assert_allclose(scale, 1e-5)
  chex.assert_trees_all_equal(assignment, jnp.zeros((3, 4), jnp.int8))


def _train_chain(kernel, grad_fn, lr, steps):
  tx = optax.chain(optax.sgd(lr), ec2t.bitnet(selection=ALL))
  params = {"w": kernel}
  state = tx.init(params)
  params = ec2t.quantized_params(params, state)
  for _ in range(steps):
    updates, state = tx.update({"w": grad_fn(params["w"])}, state, params)
    params = optax.apply_updates(params, updates)
  return params["w"], ec2t.find_quantizer_state(state).leaves["w"]


def test_latent_weights_follow_jax_grad_of_the_straight_through_composition():
  kernel = jnp.asarray(np.random.default_rng(0).normal(size=(4, 6)) * 0.1, jnp.float32)
  target = jnp.asarray(np.random.default_rng(1).normal(size=(4, 6)) * 0.1, jnp.float32)
  loss = lambda w: jnp.sum((w - target) ** 2 * jnp.arange(1.0, 7.0))

  def ternary(w):  # BitNet's forward: g T, gradient passed straight through
    a, g = ec2t.absmean_ternarize(w)
    return w + jax.lax.stop_gradient(g * a - w)

  latent = kernel
  for _ in range(3):
    latent = latent - 0.05 * jax.grad(lambda w: loss(ternary(w)))(latent)
  weights, leaf = _train_chain(kernel, jax.grad(loss), 0.05, 3)
  np.testing.assert_allclose(leaf.latent, latent, rtol=1e-6, atol=1e-7)
  a, g = ec2t.absmean_ternarize(latent)
  chex.assert_trees_all_equal(leaf.assignment, a)
  np.testing.assert_allclose(weights, g * a, rtol=1e-6)


def test_apply_updates_lands_exactly_on_the_scale_times_assignment():
  kernel = jnp.asarray(np.random.default_rng(2).normal(size=(5, 7)), jnp.float32)
  weights, leaf = _train_chain(kernel, lambda w: jnp.sin(w), 0.1, 2)
  values = np.unique(np.asarray(weights))
  assert len(values) <= 3 and -values[0] == values[-1]
  chex.assert_trees_all_equal(weights, leaf.value(jnp.float32))


def test_summary_names_the_method_and_counts_the_zeros():
  summary = ec2t.summary(ec2t.bitnet(selection=ALL).init({"w": W.reshape(2, 3)}))
  assert summary.method == "BitNet"
  np.testing.assert_allclose(summary.layers[0].sparsity, 0.5)


def test_activations_land_on_the_per_token_int8_grid():
  x = jnp.array([[1.0, -0.5, 0.25, 0.003], [0.0, 0.0, 0.0, 0.0], [-4.0, 2.0, 1.0, 0.5]])
  q = np.asarray(ec2t.quantize_activations_int8(x))
  expected = np.array([[127, -64, 32, 0], [0, 0, 0, 0], [-127, 64, 32, 16]]) / np.array(
      [[127.0], [127.0 / 1e-5], [127.0 / 4.0]])
  np.testing.assert_allclose(q, expected, rtol=1e-6)


def test_activation_quantizer_passes_the_gradient_straight_through():
  x = jax.random.normal(jax.random.key(0), (3, 8))
  c = jax.random.normal(jax.random.key(1), (3, 8))
  grad = jax.grad(lambda v: jnp.sum(ec2t.quantize_activations_int8(v) * c))(x)
  np.testing.assert_allclose(grad, c)


def test_activation_quantizer_rejects_integer_input():
  with pytest.raises(ValueError, match="int32"):
    ec2t.quantize_activations_int8(jnp.arange(4))


@pytest.mark.parametrize("leaf, message", [
    (jnp.arange(6, dtype=jnp.int32).reshape(2, 3), "'bad'.*dtype int32"),
    (jnp.ones(()), "'bad'.*shape"),
])
def test_integer_and_scalar_leaves_are_rejected_at_init_by_path(leaf, message):
  with pytest.raises(ValueError, match=message):
    ec2t.bitnet(selection=ALL).init({"bad": leaf})


@pytest.mark.parametrize("epsilon", [0.0, -1e-5, float("nan")])
def test_a_non_positive_epsilon_is_rejected_at_construction(epsilon):
  with pytest.raises(ValueError, match="epsilon"):
    ec2t.bitnet(epsilon)
