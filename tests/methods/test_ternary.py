"""The pure EC2T functions against hand-computed vectors and jax.grad."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ec2t_jax as ec2t
from ec2t_jax._src.methods.ec2t import chain as ec2t_method
from ec2t_jax._src.methods.ec2t import ternary

# The test vector of the baselines document, with s = 0.5:
# w_p = 0.5 * 0.9 = 0.45, w_n = 0.5 * 0.6 = 0.3, thresholds 0.225 and -0.15.
W = jnp.array([0.9, -0.05, 0.3, -0.6, 0.02, 0.1])
W_N, W_P = 0.3, 0.45
I = np.array([np.log2(6.0), 1.0, np.log2(3.0)])  # P = (1/6, 1/2, 1/3)
# lambda_n = (0.6^2 - (0.3 - 0.6)^2) / (log2 6 - 1) = 0.27 / 1.5849625
# lambda_p = (0.9^2 - (0.45 - 0.9)^2) / (log2 3 - 1) = 0.6075 / 0.5849625
LAMBDA_MAX = 0.27 / (np.log2(6.0) - 1.0)


class PureFunctionsTest(chex.TestCase):
  """Each pure function, jitted and eager, against hand-computed values."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_initial_centroids_scale_the_extreme_weights(self):
    w_n, w_p = self.variant(ec2t.initial_centroids)(W, 0.5)
    np.testing.assert_allclose([w_n, w_p], [W_N, W_P], rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_extremes_are_the_magnitudes_of_min_and_max(self):
    chex.assert_trees_all_equal(self.variant(ternary.extremes)(W),
                                (jnp.float32(0.6), jnp.float32(0.9)))

  @chex.variants(with_jit=True, without_jit=True)
  def test_nearest_centroid_assign_uses_midpoint_thresholds(self):
    a = self.variant(ec2t.nearest_centroid_assign)(W, W_N, W_P)
    chex.assert_trees_all_equal(a, jnp.array([1, 0, 1, -1, 0, 0], jnp.int8))

  @chex.variants(with_jit=True, without_jit=True)
  def test_nearest_centroid_assign_breaks_ties_towards_zero(self):
    a = self.variant(ec2t.nearest_centroid_assign)(jnp.array([0.25, -0.25]),
                                                   0.5, 0.5)
    chex.assert_trees_all_equal(a, jnp.array([0, 0], jnp.int8))

  @chex.variants(with_jit=True, without_jit=True)
  def test_cluster_counts_of_each_cluster(self):
    counts = self.variant(ec2t.cluster_counts)(
        jnp.array([[1, 0], [1, -1], [0, 0]], jnp.int8))
    chex.assert_trees_all_equal(counts, jnp.array([1.0, 3.0, 2.0]))

  @chex.variants(with_jit=True, without_jit=True)
  def test_cluster_probabilities_without_floor(self):
    p = self.variant(ec2t.cluster_probabilities)(
        jnp.array([1, 0, 1, -1, 0, 0], jnp.int8))
    np.testing.assert_allclose(p, [1 / 6, 1 / 2, 1 / 3], rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_cluster_probabilities_count_an_empty_cluster_as_one_weight(self):
    p = self.variant(ec2t.cluster_probabilities)(
        jnp.array([0, 0, 0, 1], jnp.int8))
    np.testing.assert_allclose(p, [0.25, 0.75, 0.25], rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_cluster_probabilities_floor_the_zero_cluster_and_renormalize(self):
    # counts (n, 0, p) = (1, 0 -> 1, 3) of 4: P = (.25, .25, .75); P_0 -> 0.5,
    # the rest 0.5 shared 1:3.
    p = self.variant(ec2t.cluster_probabilities)(
        jnp.array([1, 1, 1, -1], jnp.int8))
    np.testing.assert_allclose(p, [0.125, 0.5, 0.375], rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_cluster_probabilities_reference_renormalization_quirk(self):
    # excess 0.25; P_n = .25 - .25 * .25 / 1 = .1875;
    # P_p = .75 - .25 * .75 / (.1875 + .75) = .55 (uses the lowered P_n).
    p = self.variant(lambda a: ec2t.cluster_probabilities(
        a, renormalization="reference"))(jnp.array([1, 1, 1, -1], jnp.int8))
    np.testing.assert_allclose(p, [0.1875, 0.5, 0.55], rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_information_content_is_minus_log2(self):
    np.testing.assert_allclose(
        self.variant(ec2t.information_content)(jnp.array([1 / 6, 0.5, 1 / 3])),
        I, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_lambda_max_is_the_smaller_side(self):
    lam = self.variant(ec2t.lambda_max)(W, W_N, W_P, I)
    np.testing.assert_allclose(lam, LAMBDA_MAX, rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_lambda_max_makes_the_extreme_weight_tie_with_zero(self):
    lam = self.variant(ec2t.lambda_max)(W, W_N, W_P, I)
    cost_n = (-0.6 + W_N) ** 2 + lam * I[0]
    cost_0 = 0.6 ** 2 + lam * I[1]
    np.testing.assert_allclose(cost_n, cost_0, rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_lambda_max_of_a_side_that_cannot_flip_is_ignored(self):
    # I_p == I_0: the p side never flips, so the n side decides.
    info = np.array([np.log2(6.0), 1.0, 1.0])
    lambda_max = self.variant(ec2t.lambda_max)
    np.testing.assert_allclose(lambda_max(W, W_N, W_P, info), LAMBDA_MAX,
                               rtol=1e-5)
    assert lambda_max(W, W_N, W_P, np.ones(3)) == 0.0

  @chex.variants(with_jit=True, without_jit=True)
  def test_entropy_constrained_assign_scales_lambda_by_size_decay(self):
    _, lam = self.variant(lambda w: ec2t.entropy_constrained_assign(
        w, W_N, W_P, gamma=0.5, size_decay=0.25))(W)
    np.testing.assert_allclose(lam, 0.125 * LAMBDA_MAX, rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_assign_by_cost_is_argmin_of_the_cost(self):
    a = self.variant(ec2t.assign_by_cost)(jnp.array([0.3, 0.3]), 0.3, 0.45,
                                          0.2, I)
    # 0.3: p costs .0225 + .2 * 1.585 = .3395, zero costs .09 + .2 = .29.
    chex.assert_trees_all_equal(a, jnp.array([0, 0], jnp.int8))

  @chex.variants(with_jit=True, without_jit=True)
  def test_ternary_values_of_an_assignment(self):
    t = self.variant(ec2t.ternary_values)(jnp.array([1, 0, -1], jnp.int8),
                                          0.2, 0.3)
    np.testing.assert_allclose(t, [0.3, 0.0, -0.2])

  @chex.variants(with_jit=True, without_jit=True)
  def test_ternary_values_keep_the_requested_dtype(self):
    t = self.variant(lambda a: ec2t.ternary_values(a, 0.2, 0.3, jnp.bfloat16))(
        jnp.array([1, -1], jnp.int8))
    chex.assert_type(t, jnp.bfloat16)

  @chex.variants(with_jit=True, without_jit=True)
  def test_centroid_floor_uses_unbiased_std(self):
    w = jnp.array([1.0, 2.0, 3.0, 4.0])
    w_n, w_p = self.variant(ec2t.centroid_floor)(w, 0.5, 2.0)
    np.testing.assert_allclose(
        [w_n, w_p], [0.675 * np.std([1, 2, 3, 4], ddof=1), 2.0], rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_latent_gradient_matches_ttq_test_vector(self):
    # TTQ with t = 0.05: clusters [+, -, +, -, 0, +], multipliers
    # [W_p, W_n, W_p, W_n, 1, W_p].
    a = jnp.array([1, -1, 1, -1, 0, 1], jnp.int8)
    g = jnp.arange(1.0, 7.0)
    np.testing.assert_allclose(
        self.variant(ec2t.latent_gradient)(g, a, 2.0, 3.0),
        [3.0, 4.0, 9.0, 8.0, 5.0, 18.0])

  @chex.variants(with_jit=True, without_jit=True)
  def test_centroid_gradients_reference_sign_flips_only_w_n(self):
    a = jnp.array([1, -1, -1, 0], jnp.int8)
    g = jnp.array([1.0, 2.0, 3.0, 4.0])
    np.testing.assert_allclose(self.variant(ec2t.centroid_gradients)(g, a),
                               [-5.0, 1.0])
    np.testing.assert_allclose(
        self.variant(lambda g, a: ec2t.centroid_gradients(
            g, a, negative_sign="reference"))(g, a), [5.0, 1.0])

  @chex.variants(with_jit=True, without_jit=True)
  def test_ternary_entropy_in_bits_per_weight(self):
    entropy = self.variant(ec2t.ternary_entropy)
    np.testing.assert_allclose(entropy(jnp.array([1, -1, 0, 0], jnp.int8)), 1.5)
    np.testing.assert_allclose(entropy(jnp.zeros(8, jnp.int8)), 0.0)
    np.testing.assert_allclose(entropy(jnp.array([1, -1, 0], jnp.int8)),
                               np.log2(3.0), rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_cluster_means_of_n_and_p_with_fallbacks(self):
    means = self.variant(ec2t_method.cluster_means)
    values = jnp.array([[1.0, 3.0], [-2.0, 4.0]])
    chex.assert_trees_all_close(
        means(values, jnp.array([[1, 1], [-1, 0]], jnp.int8), 7.0, 9.0),
        (jnp.float32(-2.0), jnp.float32(2.0)))
    chex.assert_trees_all_close(  # empty clusters give their fallbacks
        means(values, jnp.zeros((2, 2), jnp.int8), 7.0, 9.0),
        (jnp.float32(7.0), jnp.float32(9.0)))


def test_layer_size_decay_with_sustain():
  np.testing.assert_allclose(ec2t.layer_size_decay([100, 50, 10]),
                             [1.0, 0.55 / 1.05, 0.15 / 1.05])


def test_layer_size_decay_rejects_empty_layers():
  with pytest.raises(ValueError, match="numels"):
    ec2t.layer_size_decay([10, 0])


@pytest.mark.parametrize("gamma, expected", [
    (0.0, [1, 0, 1, -1, 0, 0]),
    # lambda = 0.5 * 0.17035 = 0.0852: 0.3 costs .0225 + .0852 * 1.585 = .1575
    # as p and .09 + .0852 = .1752 as zero: stays p.
    (0.5, [1, 0, 1, -1, 0, 0]),
    # lambda = 0.9 * 0.17035 = 0.1533: 0.3 costs .2655 as p, .2433 as zero;
    # -0.6 costs .4863 as n, .5133 as zero: stays n.
    (0.9, [1, 0, 0, -1, 0, 0]),
])
@pytest.mark.parametrize("jit", [False, True])
def test_entropy_constrained_assign_hand_computed(gamma, expected, jit):
  assign = lambda w: ec2t.entropy_constrained_assign(w, W_N, W_P, gamma=gamma)
  a, lam = (jax.jit(assign) if jit else assign)(W)
  chex.assert_trees_all_equal(a, jnp.array(expected, jnp.int8))
  np.testing.assert_allclose(lam, gamma * LAMBDA_MAX, rtol=1e-5)


def _straight_through_ternary(latent, assignment, w_n, w_p):
  """T in the forward pass, d T / d W = TTQ's scale in the backward pass."""
  scale = jnp.where(assignment > 0, w_p, jnp.where(assignment < 0, w_n, 1.0))
  t = ec2t.ternary_values(assignment, w_n, w_p)
  return jax.lax.stop_gradient(t - scale * latent) + scale * latent


def test_latent_gradient_equals_jax_grad_of_straight_through_ternary():
  key = jax.random.key(0)
  latent = jax.random.normal(key, (5, 7))
  upstream = jax.random.normal(jax.random.key(1), (5, 7))
  w_n, w_p = 0.4, 0.7
  a = ec2t.nearest_centroid_assign(latent, w_n, w_p)
  loss = lambda w: jnp.sum(upstream * _straight_through_ternary(w, a, w_n, w_p))
  np.testing.assert_allclose(jax.grad(loss)(latent),
                             ec2t.latent_gradient(upstream, a, w_n, w_p),
                             rtol=1e-6)


def test_centroid_gradients_equal_jax_grad_of_ternary_values():
  latent = jax.random.normal(jax.random.key(2), (64,))
  upstream = jax.random.normal(jax.random.key(3), (64,))
  a = ec2t.nearest_centroid_assign(latent, 0.5, 0.6)
  loss = lambda w_n, w_p: jnp.sum(upstream * ec2t.ternary_values(a, w_n, w_p))
  expected = jax.grad(loss, argnums=(0, 1))(0.5, 0.6)
  np.testing.assert_allclose(ec2t.centroid_gradients(upstream, a), expected,
                             rtol=1e-5)


def test_centroid_gradients_reject_an_unknown_sign():
  with pytest.raises(ValueError, match="negative_sign"):
    ec2t.centroid_gradients(jnp.ones(2), jnp.ones(2, jnp.int8),
                            negative_sign="plus")


# Exact ties, hand-computed with w_n = w_p = 1 (every value exact in float32).
# At lambda 0: W = -0.5 costs 0.25 as n and as 0; W = 0.5 costs 0.25 as 0 and as p.
# With lambda 1 at W = 0: I = (0, 1, 0) gives n = 0 = p = 1 (three-way tie);
# I = (0, 2, 0) gives n = p = 1 < 2 (n/p tie); I = (1, 0, 0) and W = 0.5 give
# 0 = p = 0.25 < n = 3.25 (0/p tie).
_TIES = jnp.array([-0.5, 0.5, 0.0, -0.75, 0.75])
_ZERO_RULE = jnp.array([0, 0, 0, -1, 1], jnp.int8)
_REFERENCE_RULE = jnp.array([-1, 0, 0, -1, 1], jnp.int8)


class TieRuleTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_nearest_centroid_sends_an_n_zero_tie_to_zero_by_default(self):
    assign = self.variant(lambda w: ec2t.nearest_centroid_assign(w, 1.0, 1.0))
    chex.assert_trees_all_equal(assign(_TIES), _ZERO_RULE)

  @chex.variants(with_jit=True, without_jit=True)
  def test_nearest_centroid_sends_an_n_zero_tie_to_n_by_the_reference_rule(self):
    assign = self.variant(
        lambda w: ec2t.nearest_centroid_assign(w, 1.0, 1.0, ties="reference"))
    chex.assert_trees_all_equal(assign(_TIES), _REFERENCE_RULE)

  @chex.variants(with_jit=True, without_jit=True)
  def test_assign_by_cost_tie_rules_on_three_way_n_p_and_zero_p_ties(self):
    cases = [(0.0, [0.0, 1.0, 0.0], 0, -1), (0.0, [0.0, 2.0, 0.0], -1, -1),
             (0.5, [1.0, 0.0, 0.0], 0, 0)]
    for w, information, zero_rule, reference_rule in cases:
      for ties, expected in (("zero", zero_rule), ("reference", reference_rule)):
        assign = self.variant(lambda w, info, ties=ties: ec2t.assign_by_cost(
            w, 1.0, 1.0, 1.0, info, ties=ties))
        chex.assert_trees_all_equal(
            assign(jnp.array([w]), jnp.array(information)),
            jnp.array([expected], jnp.int8))

  @chex.variants(with_jit=True, without_jit=True)
  def test_entropy_constrained_assign_passes_the_tie_rule_on(self):
    # gamma 0: lambda 0, so both assignments are the nearest-centroid ones.
    for ties, expected in (("zero", _ZERO_RULE), ("reference", _REFERENCE_RULE)):
      assign = self.variant(lambda w, ties=ties: ec2t.entropy_constrained_assign(
          w, 1.0, 1.0, gamma=0.0, ties=ties)[0])
      chex.assert_trees_all_equal(assign(_TIES), expected)


def test_unknown_tie_rule_is_an_error():
  with pytest.raises(ValueError, match="ties must be 'zero' or 'reference', got 'n'"):
    ec2t.assign_by_cost(_TIES, 1.0, 1.0, 0.0, jnp.zeros(3), ties="n")


@pytest.mark.parametrize("gamma", [0.0, 0.5, 0.9])
def test_zero_boundaries_are_where_assign_by_cost_switches(gamma):
  lam, info = ternary.entropy_constrained_lambda(W, W_N, W_P, gamma=gamma)
  b_n, b_p = ternary.zero_boundaries(W_N, W_P, lam, info)
  eps = 1e-4
  probes = jnp.array([b_n - eps, b_n + eps, b_p - eps, b_p + eps])
  chex.assert_trees_all_equal(
      ec2t.assign_by_cost(probes, W_N, W_P, lam, info),
      jnp.array([-1, 0, 0, 1], jnp.int8))


def test_entropy_constrained_lambda_is_the_assignments_lambda():
  lam, _ = ternary.entropy_constrained_lambda(W, W_N, W_P, gamma=0.5)
  _, expected = ec2t.entropy_constrained_assign(W, W_N, W_P, gamma=0.5)
  chex.assert_trees_all_equal(lam, expected)
