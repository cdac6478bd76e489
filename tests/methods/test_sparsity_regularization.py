"""Faraone et al.'s stage-1 regulariser (this library's formula) against numpy and jax.grad."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ec2t_jax as ec2t


def _params(seed=0):
  rng = np.random.default_rng(seed)
  leaf = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  return {"Conv_0": {"kernel": leaf(3, 3, 1, 4), "bias": leaf(4)},
          "Conv_1": {"kernel": leaf(3, 3, 4, 8), "bias": leaf(8)},
          "Dense_0": {"kernel": leaf(32, 16), "bias": leaf(16)},
          "Dense_1": {"kernel": leaf(16, 10), "bias": leaf(10)}}


def _numpy_value_and_grad(w, l2, strength, factor, temperature):
  w = np.asarray(w, np.float64)
  delta = factor * np.abs(w).mean()
  z = (np.abs(w) - delta) / (temperature * delta)
  sig = 1 / (1 + np.exp(-z))
  value = 0.5 * l2 * np.sum(w ** 2) + strength * sig.mean()
  grad = l2 * w + strength * sig * (1 - sig) * np.sign(w) / (w.size * temperature * delta)
  return value, grad


def test_value_and_gradient_match_the_documented_formula():
  params = _params()
  reg = ec2t.sparsity_regularizer(l2=1e-3, strength=0.5, factor=0.7, temperature=0.25)
  value, grads = jax.value_and_grad(reg)(params)
  expected_value = 0.0
  for name in ("Conv_1", "Dense_0"):  # the paper's rule: not the first, not the last kernel
    v, g = _numpy_value_and_grad(params[name]["kernel"], 1e-3, 0.5, 0.7, 0.25)
    expected_value += v
    np.testing.assert_allclose(grads[name]["kernel"], g, rtol=1e-4, atol=1e-9)
  np.testing.assert_allclose(value, expected_value, rtol=1e-5)
  for name in ("Conv_0", "Dense_1"):
    assert not np.any(np.asarray(grads[name]["kernel"]))
  assert not np.any(np.asarray(grads["Dense_0"]["bias"]))


def test_default_strength_is_the_measured_three_not_the_former_one_hundredth():
  params = _params()
  value = ec2t.sparsity_regularizer()(params)
  expected = sum(_numpy_value_and_grad(params[name]["kernel"], 0.0, 3.0, 0.7, 0.25)[0]
                 for name in ("Conv_1", "Dense_0"))
  np.testing.assert_allclose(value, expected, rtol=1e-5)


def test_gradient_step_shrinks_weights_and_most_near_the_threshold():
  w = jnp.asarray(np.random.default_rng(1).normal(size=(400, 5)), jnp.float32)
  reg = ec2t.sparsity_regularizer(strength=1.0, selection=lambda path, leaf: True)
  g = np.asarray(jax.grad(reg)({"w": w})["w"])
  assert np.all(g * np.asarray(w) >= 0)  # descent never grows |W|
  delta = 0.7 * np.abs(np.asarray(w)).mean()
  magnitude = np.abs(np.asarray(w))
  near = np.abs(g[np.abs(magnitude - delta) < 0.05 * delta]).mean()
  far = np.abs(g[magnitude > 3 * delta]).mean()
  assert near > 10 * far


def test_density_is_the_fraction_above_the_threshold_at_low_temperature():
  w = jnp.asarray(np.random.default_rng(2).normal(size=1000), jnp.float32)
  delta = 0.7 * np.abs(np.asarray(w)).mean()
  hard = np.mean(np.abs(np.asarray(w)) > delta)
  np.testing.assert_allclose(ec2t.threshold_density(w, 0.7, 1e-4), hard, atol=2e-3)


class RegularizerVariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_gradient_agrees_with_and_without_jit(self):
    params = _params(3)
    reg = ec2t.sparsity_regularizer(l2=1e-4, strength=1e-2)
    chex.assert_trees_all_close(self.variant(jax.grad(reg))(params), jax.grad(reg)(params),
                                rtol=1e-6)


@pytest.mark.parametrize("name", ["l2", "strength"])
def test_negative_weights_are_rejected_by_name(name):
  with pytest.raises(ValueError, match=rf"{name} must be in \[0, inf\) \(finite\), got -0.1"):
    ec2t.sparsity_regularizer(**{name: -0.1})


@pytest.mark.parametrize("name", ["factor", "temperature"])
def test_non_positive_factor_and_temperature_are_rejected_by_name(name):
  with pytest.raises(ValueError, match=name):
    ec2t.sparsity_regularizer(**{name: 0.0})
