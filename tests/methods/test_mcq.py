"""MCQ: the baselines.md hit-count vector, sums, determinism, tree-level selection."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ec2t_jax as ec2t
from ec2t_jax._src.methods import mcq as mcq_lib


class HitsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_baselines_vector(self):
    q, scale = self.variant(mcq_lib.mcq_hits)(jnp.array([0.5, -0.3, 0.2, 0.0]), 4, 0.5)
    np.testing.assert_array_equal(q, [2, -1, 1, 0])
    assert float(scale) == 0.25

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_brute_force_sampling(self):
    w = jax.random.normal(jax.random.key(0), (37,))
    for n, xi in [(37, 0.3), (100, 0.0), (5, 0.99)]:
      q, _ = self.variant(mcq_lib.mcq_hits)(w, n, xi)
      p = np.abs(np.asarray(w, np.float64))
      cdf = np.cumsum(p) / p.sum()
      samples = (np.arange(n) + xi) / n
      hits = np.bincount(np.searchsorted(cdf, samples, side="right"), minlength=37)[:37]
      np.testing.assert_array_equal(np.abs(np.asarray(q)), hits)
      assert int(np.abs(np.asarray(q)).sum()) == n

  def test_signs_follow_weights_and_zero_never_hit(self):
    w = jnp.array([0.0, -1.0, 2.0, 0.0, -0.5])
    q, _ = mcq_lib.mcq_hits(w, 50, 0.7)
    q = np.asarray(q)
    assert q[0] == 0 and q[3] == 0 and q[1] < 0 and q[2] > 0 and q[4] < 0

  def test_all_zero_group(self):
    q, scale = mcq_lib.mcq_hits(jnp.zeros(4), 8, 0.5)
    np.testing.assert_array_equal(q, 0)
    assert float(scale) == 0.0

  def test_unbiased_on_average_over_offsets(self):
    w = jnp.array([0.5, -0.3, 0.2, 0.05])
    offsets = jnp.linspace(0, 1, 1000, endpoint=False)
    q, scale = jax.vmap(lambda o: mcq_lib.mcq_hits(w, 8, o))(offsets)
    mean = (q * scale[:, None]).mean(0)
    chex.assert_trees_all_close(mean, w, atol=1e-3)


class QuantizeTest(chex.TestCase):

  def test_per_neuron_groups_sum_to_their_samples(self):
    w = jax.random.normal(jax.random.key(2), (6, 4))
    q, scales = mcq_lib.mcq_quantize(w, 2.0, jax.random.key(3), per_neuron=True)
    chex.assert_shape(scales, (4,))
    np.testing.assert_array_equal(np.abs(np.asarray(q)).sum(0), [12] * 4)
    chex.assert_trees_all_close(scales, jnp.abs(w).sum(0) / 12)

  def test_more_samples_fewer_zeros_and_smaller_error(self):
    w = jax.random.normal(jax.random.key(4), (64, 32))
    key = jax.random.key(5)
    stats = []
    for k in (0.25, 1.0, 8.0):
      q, s = mcq_lib.mcq_quantize(w, k, key)
      stats.append((float(jnp.mean(q == 0)), float(jnp.mean((q * s - w) ** 2))))
    assert stats[0][0] > stats[1][0] > stats[2][0]
    assert stats[0][1] > stats[1][1] > stats[2][1]


def _params():
  k = jax.random.split(jax.random.key(0), 3)
  return {"Dense_0": {"kernel": jax.random.normal(k[0], (8, 16)), "bias": jnp.ones(16)},
          "Dense_1": {"kernel": jax.random.normal(k[1], (16, 16)), "bias": jnp.ones(16)},
          "Dense_2": {"kernel": jax.random.normal(k[2], (16, 4)), "bias": jnp.ones(4)}}


def test_mcq_touches_the_selection_only_and_is_deterministic():
  params = _params()
  a, integers = ec2t.mcq(params, 2.0, key=jax.random.key(7), return_integers=True)
  b = ec2t.mcq(params, 2.0, key=jax.random.key(7))
  c = ec2t.mcq(params, 2.0, key=jax.random.key(8))
  chex.assert_trees_all_equal(a, b)
  assert not np.array_equal(a["Dense_1"]["kernel"], c["Dense_1"]["kernel"])
  for name in ("Dense_0", "Dense_2"):  # the paper's rule: first and last stay
    chex.assert_trees_all_equal(a[name], params[name])
  chex.assert_trees_all_equal(a["Dense_1"]["bias"], params["Dense_1"]["bias"])
  q, scale = integers["Dense_1"]["kernel"]
  np.testing.assert_array_equal(a["Dense_1"]["kernel"], np.asarray(q) * np.asarray(scale))
  assert int(np.abs(np.asarray(q)).sum()) == 512
  assert integers["Dense_0"]["kernel"] is None


def test_mcq_rules_choose_leaves():
  params = _params()
  out = ec2t.mcq(params, 1.0, key=jax.random.key(0), selection=ec2t.Selection([ec2t.Rule("Dense_0/kernel")], default="none"))
  assert not np.array_equal(out["Dense_0"]["kernel"], params["Dense_0"]["kernel"])
  chex.assert_trees_all_equal(out["Dense_1"], params["Dense_1"])


def test_mcq_nnx_state():
  from flax import nnx
  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.layers = nnx.List([nnx.Linear(4, 8, rngs=rngs), nnx.Linear(8, 8, rngs=rngs),
                              nnx.Linear(8, 2, rngs=rngs)])
  state = nnx.state(MLP(nnx.Rngs(0)), nnx.Param)
  out = ec2t.mcq(state, 1.0, key=jax.random.key(0))
  assert isinstance(out, nnx.State)
  before = state["layers"][1]["kernel"][...]
  after = out["layers"][1]["kernel"][...]
  assert len(np.unique(np.asarray(after))) < len(np.unique(np.asarray(before)))
  np.testing.assert_array_equal(out["layers"][0]["kernel"][...], state["layers"][0]["kernel"][...])


@pytest.mark.parametrize("k", [0, -1, float("nan"), "x"])
def test_bad_samples_named(k):
  with pytest.raises(ValueError, match="samples_per_weight"):
    ec2t.mcq(_params(), k, key=jax.random.key(0))


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_mcq_refuses_a_selected_leaf_holding_a_non_finite_weight_and_names_it(bad):
  params = {"a": jnp.ones((3, 3)), "b": jnp.ones((3, 4)).at[1, 2].set(bad), "c": jnp.ones((4, 2))}
  with pytest.raises(ValueError, match=r"leaf \['b'\] holds non-finite weights"):
    ec2t.mcq(params, 1.0, key=jax.random.key(0))


def test_mcq_passes_a_non_finite_leaf_it_does_not_quantize_through():
  params = {"a": jnp.full((3, 3), jnp.inf), "b": jnp.ones((3, 4)), "c": jnp.ones((4, 2))}
  out = ec2t.mcq(params, 1.0, key=jax.random.key(0))  # "a" is the first layer: kept
  assert bool(jnp.isinf(out["a"]).all()) and bool(jnp.isfinite(out["b"]).all())


@pytest.mark.parametrize("samples", ["2", True, None])
def test_mcq_samples_per_weight_must_be_a_number(samples):
  with pytest.raises(ValueError, match="samples_per_weight must be a positive"):
    ec2t.mcq({"a": jnp.ones((3, 3)), "b": jnp.ones((3, 4)), "c": jnp.ones((4, 2))}, samples,
             key=jax.random.key(0))
