"""INQ pure functions: codebooks and quantization against baselines.md, partitions."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ec2t_jax as ec2t

from ec2t_jax._src.methods import inq

W = jnp.array([0.9, -0.05, 0.3, -0.6, 0.02, 0.1], jnp.float32)


class QuantizeTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_baselines_vectors(self):
    quantize = self.variant(inq.inq_quantize, static_argnums=1)
    expected = {5: [1, -0.0625, 0.25, -0.5, 0.015625, 0.125],
                3: [1, 0, 0.5, -0.5, 0, 0],
                2: [1, 0, 0, -1, 0, 0]}
    for bits, want in expected.items():
      chex.assert_trees_all_equal(quantize(W, bits), jnp.array(want, jnp.float32))

  @chex.variants(with_jit=True, without_jit=True)
  def test_exponents_of_test_vector(self):
    n1, n2 = self.variant(inq.inq_exponents, static_argnums=1)(0.9, 5)
    assert (int(n1), int(n2)) == (0, -7)

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_brute_force_nearest_codebook_value(self):
    w = jax.random.normal(jax.random.key(0), (2000,)) * 0.3
    for bits in (2, 3, 4, 5, 8):
      got = np.asarray(self.variant(inq.inq_quantize, static_argnums=1)(w, bits))
      book = np.asarray(inq.inq_codebook(jnp.max(jnp.abs(w)), bits), np.float64)
      dist = np.abs(np.asarray(w, np.float64)[:, None] - book[None, :])
      # Ties go to the larger magnitude, as in the paper's thresholds.
      best = dist.min(1, keepdims=True)
      candidates = np.where(dist == best, np.abs(book)[None, :], -1)
      want = book[np.argmax(candidates, 1)]
      np.testing.assert_array_equal(got, want.astype(np.float32))


def test_codebook_sizes_and_values():
  for bits in (2, 3, 5):
    book = np.asarray(inq.inq_codebook(0.9, bits))
    assert len(book) == 2 * max(1, 2 ** (bits - 1) // 2) + 1
    assert book.max() == 1.0 and np.all(book == -book[::-1])
  np.testing.assert_array_equal(inq.inq_codebook(0.9, 3), [-1, -0.5, 0, 0.5, 1])


def test_n1_exact_on_boundaries():
  # 4/3 * 0.75 = 1 exactly in real numbers: n1 = 0 even if the float product rounds.
  for value, n1 in [(0.75, 0), (0.7499999, -1), (1.5, 1), (1.4999999, 0), (3 * 2.0 ** -10, -8)]:
    assert int(inq.inq_exponents(jnp.float32(value), 2)[0]) == n1, value


def test_ties_round_to_larger_magnitude_and_zero_is_positive():
  w = jnp.array([0.75, 0.375, 0.25, 0.2499, -0.1, 0.0], jnp.float32)  # max 0.75: book {0, .5, 1}
  got = inq.inq_quantize(w, 3)
  np.testing.assert_array_equal(got, [1.0, 0.5, 0.5, 0.0, 0.0, 0.0])
  assert not np.any(np.signbit(np.asarray(got)[np.asarray(got) == 0]))


def test_all_zero_layer_stays_zero():
  np.testing.assert_array_equal(inq.inq_quantize(jnp.zeros((3, 3)), 5), np.zeros((3, 3)))


class FrozenMaskTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_grows_by_largest_free_magnitude(self):
    w = jnp.array([0.1, -0.9, 0.5, 0.2, -0.3, 0.05, 0.7, -0.05])
    frozen = jnp.zeros(8, bool)
    grow = self.variant(inq.inq_frozen_mask)
    frozen = grow(w, frozen, 0.5)
    np.testing.assert_array_equal(frozen, [0, 1, 1, 0, 1, 0, 1, 0])
    # Retrained free weights may outgrow frozen ones: frozen stay, next largest free join.
    w = w.at[0].set(2.0)
    frozen = grow(w, frozen, 0.75)
    np.testing.assert_array_equal(frozen, [1, 1, 1, 1, 1, 0, 1, 0])
    frozen = grow(w, frozen, 1.0)
    assert bool(frozen.all())

  def test_count_is_rounded_portion(self):
    w = jax.random.normal(jax.random.key(1), (7, 5))
    for portion in (0.2, 0.5, 0.875):
      mask = inq.inq_frozen_mask(w, jnp.zeros_like(w, bool), portion)
      assert int(mask.sum()) == round(portion * 35)
      assert float(jnp.abs(w)[mask].min()) >= float(jnp.abs(w)[~mask].max())


@pytest.mark.parametrize("bits", [1, 9, 2.0, True, "3"])
def test_bad_bits_named(bits):
  with pytest.raises(ValueError, match="bits"):
    inq.check_bits(bits)


@pytest.mark.parametrize("portions,why", [
    ((0.5, 0.4, 1.0), "increasing"), ((0.5, 0.75), "end at 1"), ((), "empty"),
    ((0.0, 1.0), r"\(0, 1\]"), ((0.5, 1.5), r"\(0, 1\]"), ((0.5, 0.5, 1.0), "increasing")])
def test_bad_portions_named(portions, why):
  with pytest.raises(ValueError, match=f"portions.*{why}|{why}"):
    inq.check_portions(portions)


def test_default_portions_are_the_official_run_py_ones():
  assert ec2t.get_method("inq").options()["portions"] == (0.3, 0.6, 0.8, 1.0)


def test_official_stage_schedule_is_the_solver_step_policy_scaled_to_the_stage():
  # solver.prototxt: base_lr 0.003, gamma 0.2 every 15000 of 63000 iterations.
  sched = ec2t.official_stage_schedule(63000)
  for t in (0, 14999, 15000, 29999, 30000, 45000, 62999):
    np.testing.assert_allclose(float(sched(t)), 0.003 * 0.2 ** (t // 15000), rtol=1e-6)


def test_official_stage_optimizer_restarts_and_anneals_within_each_stage():
  import optax  # pylint: disable=g-import-not-at-top
  params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(4, 4)), jnp.float32)}
  tx = ec2t.restart_on_stage(ec2t.official_stage_optimizer(8),
                             ec2t.inq(3, (0.5, 1.0), steps_per_stage=8,
                                      selection=lambda path, leaf: True))
  state = tx.init(params)
  inner_counts = []
  for _ in range(12):
    _, state = tx.update({"w": jnp.zeros((4, 4))}, state, params)
    inner_counts.append(int(optax.tree_utils.tree_get(state.inner, "count")))
  # The inner solver restarts when the stage advances (at the 9th update) ...
  assert inner_counts[7] == 8 and inner_counts[8] == 0 and inner_counts[11] == 3
  # ... so the 8th update, the stage's last, ran at count 7: the annealed rate.
  sched = ec2t.official_stage_schedule(8)
  np.testing.assert_allclose(float(sched(7)), 0.003 * 0.2 ** 3, rtol=1e-6)


@pytest.mark.parametrize("bad", [0, -5, 2.5, True])
def test_a_schedule_that_cannot_restart_is_refused(bad):
  with pytest.raises(ValueError, match="steps_per_stage must be a positive integer"):
    ec2t.official_stage_schedule(bad)
