"""STTN's pure functions against the baselines' test vector and jax.grad."""

import chex
import jax
import jax.numpy as jnp
import numpy as np

import ec2t_jax as ec2t

# baselines.md: alpha = 0.325, T = [0.65, 0, 0, -0.65].
W1 = jnp.array([0.5, -0.2, 0.3, -0.4])
W2 = jnp.array([0.1, 0.3, -0.2, -0.6])


def test_scale_and_ternary_kernel_match_the_test_vector():
  a, alpha = ec2t.sttn_ternarize(W1, W2, per_filter=False)
  np.testing.assert_allclose(alpha, 0.325, rtol=1e-6)
  np.testing.assert_allclose(2 * alpha * a, [0.65, 0.0, 0.0, -0.65], rtol=1e-6)


def _kernels(seed=0, shape=(3, 3, 2, 4)):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.uniform(-1, 1, shape), jnp.float32),
          jnp.asarray(rng.uniform(-1, 1, shape), jnp.float32))


def test_per_filter_scale_is_the_mean_l1_over_each_output_filter():
  w1, w2 = _kernels()
  n = 3 * 3 * 2
  expected = (np.abs(w1).reshape(n, 4).sum(0) + np.abs(w2).reshape(n, 4).sum(0)) / (2 * n)
  np.testing.assert_allclose(ec2t.sttn_scale(w1, w2).reshape(4), expected, rtol=1e-6)


def test_ternary_kernel_holds_minus_two_alpha_zero_two_alpha_per_filter():
  w1, w2 = _kernels()
  a, alpha = ec2t.sttn_ternarize(w1, w2)
  kernel = np.asarray(2 * alpha * a).reshape(-1, 4)
  for f in range(4):
    two_alpha = 2 * float(alpha.reshape(4)[f])
    assert set(np.unique(kernel[:, f])) <= {-two_alpha, 0.0, two_alpha}


def test_ternary_kernel_is_the_sum_of_the_two_binary_kernels():
  w1, w2 = _kernels(1)
  a, alpha = ec2t.sttn_ternarize(w1, w2)
  binary = lambda w: alpha * jnp.where(w >= 0, 1.0, -1.0)
  np.testing.assert_allclose(2 * alpha * a, binary(w1) + binary(w2), rtol=1e-6)


@jax.custom_jvp
def _ste_sign(x):
  return jnp.where(x >= 0, 1.0, -1.0)


@_ste_sign.defjvp
def _ste_sign_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  return _ste_sign(x), jnp.where(jnp.abs(x) <= 1, dx, 0.0)


def _forward(w1, w2, per_filter):
  axes = (0, 1, 2) if per_filter else None
  alpha = (jnp.mean(jnp.abs(w1), axes, keepdims=per_filter)
           + jnp.mean(jnp.abs(w2), axes, keepdims=per_filter)) / 2
  return alpha * _ste_sign(w1) + alpha * _ste_sign(w2)


class STTNGradientTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_gradients_equal_jax_grad_of_the_straight_through_forward(self):
    w1, w2 = _kernels(2)
    w1 = w1.at[0, 0, 0, 0].set(1.5)  # outside the straight-through window
    g = jnp.asarray(np.random.default_rng(3).normal(size=w1.shape), jnp.float32)
    for per_filter in (True, False):
      oracle = jax.grad(lambda a, b: jnp.sum(g * _forward(a, b, per_filter)),
                        argnums=(0, 1))(w1, w2)
      got = self.variant(lambda g, a, b, pf=per_filter: ec2t.sttn_gradients(
          g, a, b, per_filter=pf))(g, w1, w2)
      chex.assert_trees_all_close(got, oracle, rtol=1e-5, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_ternarize_agrees_with_and_without_jit(self):
    w1, w2 = _kernels(4)
    chex.assert_trees_all_close(self.variant(ec2t.sttn_ternarize)(w1, w2),
                                ec2t.sttn_ternarize(w1, w2))


def test_init_reproduces_the_twn_assignment():
  w = jnp.asarray(np.random.default_rng(5).normal(size=(6, 5)), jnp.float32)
  a, _ = ec2t.sttn_ternarize(*ec2t.sttn_init(w), per_filter=False)
  chex.assert_trees_all_equal(a, ec2t.twn_ternarize(w, "layer")[0])


def test_activation_ternarizes_at_half_with_straight_through_inside_one():
  x = jnp.array([-1.5, -0.7, -0.2, 0.4, 0.6, 0.99, 3.0])
  np.testing.assert_array_equal(ec2t.ternary_activation(x), [-1, -1, 0, 0, 1, 1, 1])
  grad = jax.grad(lambda x: jnp.sum(jnp.arange(7.0) * ec2t.ternary_activation(x)))(x)
  np.testing.assert_array_equal(grad, [0, 1, 2, 3, 4, 5, 0])


def _official_grad_weight(weight_oihw, grad_oihw):
  """numpy transcription of ``BinOp.updateBinaryGradWeight`` (WeixiangXu/STTN util.py)
  for one 4-D torch kernel ``(out, in, kh, kw)``."""
  n = weight_oihw[0].size
  m_add = np.sign(weight_oihw) * grad_oihw
  m_add = m_add.sum(axis=(1, 2, 3), keepdims=True) / n
  m_add = np.broadcast_to(m_add, weight_oihw.shape) * np.sign(weight_oihw)
  m = grad_oihw.copy()
  m[(weight_oihw < -1.960) | (weight_oihw > 1.960)] = 0
  return m + m_add


def _to_torch(x):  # (kh, kw, in, out) -> (out, in, kh, kw)
  return np.transpose(np.asarray(x), (3, 2, 0, 1))


def test_official_gradients_match_the_transcribed_official_code_on_a_kernel_with_zeros():
  w1, w2 = _kernels(6)
  a, _ = ec2t.sttn_ternarize(w1, w2)
  assert np.any(np.asarray(a) == 0)  # signs disagree somewhere: T = 0 there
  g = np.random.default_rng(7).normal(size=w1.shape).astype(np.float32)
  got1, got2 = ec2t.sttn_official_gradients(g, w1, w2)
  for got, w in ((got1, w1), (got2, w2)):
    np.testing.assert_allclose(_to_torch(got), _official_grad_weight(_to_torch(w), _to_torch(g)),
                               rtol=1e-5, atol=1e-6)


def test_official_scale_term_differs_from_the_joint_one_where_the_kernel_is_zero():
  w1, w2 = jnp.array([0.5, -0.5]), jnp.array([0.5, 0.5])  # T = [2a, 0]
  g = jnp.array([0.1, 0.3])
  official, _ = ec2t.sttn_official_gradients(g, w1, w2, per_filter=False)
  # own signs (+, -): (0.1 - 0.3) / 2 = -0.1; joint signs (2, 0): 0.2 / 4 = 0.05
  np.testing.assert_allclose(official, [0.1 - 0.1, 0.3 + 0.1], rtol=1e-6, atol=1e-7)
  exact_step, _ = ec2t.sttn_gradients(g, w1, w2, per_filter=False)
  alpha = 0.5
  np.testing.assert_allclose(exact_step, [alpha * 0.1 + 0.05, alpha * 0.3 - 0.05], rtol=1e-6)


def test_official_gradient_is_the_default_and_exact_is_an_option():
  w = {"w": jnp.asarray(np.random.default_rng(8).normal(size=(4, 3)), jnp.float32)}
  u = {"w": jnp.full((4, 3), 0.01, jnp.float32)}
  select = lambda path, leaf: True
  steps = {}
  for gradient in ("official", "exact"):
    tx = ec2t.sttn(gradient=gradient, selection=select)
    state = tx.init(w)
    _, new = tx.update(u, state, w)
    steps[gradient] = new.leaves["w"].latent - state.leaves["w"].latent
  default = ec2t.sttn(selection=select)
  state = default.init(w)
  _, new = default.update(u, state, w)
  chex.assert_trees_all_equal(new.leaves["w"].latent - state.leaves["w"].latent,
                              steps["official"])
  assert not np.allclose(steps["official"], steps["exact"])


def test_unknown_gradient_rule_is_refused_by_name():
  import pytest
  with pytest.raises(ValueError, match="gradient must be one of"):
    ec2t.sttn(gradient="xnor")
