"""The shared machinery every method plugs into (``_src/core.py``)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ec2t_jax as ec2t
from ec2t_jax._src import core
from models_for_tests import batch, init, loss_fn, TERNARY_LEAVES


@functools.lru_cache(maxsize=None)
def _cached_grads():
  model, params = init()
  x, y = batch()
  return jax.jit(jax.grad(lambda p: loss_fn(model, p, x, y)))(params)


def _grads():
  """The SmallCNN's gradients (computed once; a fresh top-level dict)."""
  return dict(_cached_grads())


@functools.lru_cache(maxsize=None)
def _injected_chain():
  """A chain with gamma injected, its ternary params and the jitted update
  (compiled once for the module: gamma is a traced value in the state)."""
  _, params = init()
  tx = optax.chain(optax.adam(1e-2),
                   optax.inject_hyperparams(ec2t.ternarize_transform)(gamma=0.2))
  state = tx.init(params)
  return tx, ec2t.quantized_params(params, state), state, jax.jit(tx.update)


@pytest.mark.parametrize("gamma", [float("nan"), -1.0, 1e9, float("inf")])
def test_invalid_traced_gamma_skips_the_step_and_is_counted(gamma):
  _, params, state, update = _injected_chain()
  state = jax.tree.map(lambda x: x, state)  # a copy: hyperparams is a dict
  state[1].hyperparams["gamma"] = jnp.asarray(gamma)
  updates, new_state = update(_grads(), state, params)
  new_params = optax.apply_updates(params, updates)
  before, after = ec2t.find_quantizer_state(state), ec2t.find_quantizer_state(new_state)
  assert int(after.invalid_hyper_count) == 1
  assert int(after.nonfinite_count) == 0
  chex.assert_trees_all_equal(after.resolved_leaves(), before.resolved_leaves())
  for name in TERNARY_LEAVES:
    chex.assert_trees_all_equal(new_params[name]["kernel"], params[name]["kernel"])
  assert "1 with invalid hyperparameters" in str(ec2t.summary(new_state))


def test_valid_traced_gamma_is_applied():
  _, params = init()
  tx = optax.inject_hyperparams(ec2t.ternarize_transform)(gamma=0.0)
  state = tx.init(params)
  state.hyperparams["gamma"] = jnp.asarray(1.0)
  _, new_state = jax.jit(tx.update)(_grads(), state, params)
  core_state = ec2t.find_quantizer_state(new_state)
  assert int(core_state.invalid_hyper_count) == 0
  assert float(core_state.field("lam")["Conv_1"]["kernel"]) > 0


def test_updates_of_another_tree_name_the_first_differing_path():
  _, params = init()
  tx = ec2t.ternarize_transform()
  state = tx.init(params)
  grads = _grads()
  grads["Conv_9"] = grads.pop("Conv_2")
  with pytest.raises(ValueError, match=r"updates does not match .*Conv_9/bias.*Conv_1/bias|updates does not match .*'Conv_9"):
    tx.update(grads, state, params)


def test_params_with_a_missing_leaf_are_named():
  _, params = init()
  tx = ec2t.ternarize_transform()
  state = tx.init(params)
  fewer = dict(params)
  del fewer["Dense_1"]
  with pytest.raises(ValueError, match="params does not match the params given to init"):
    tx.update(_grads(), state, fewer)


def test_selection_is_decided_at_init_not_at_update():
  # A rule whose leaves change between init and update does not re-plan:
  # the state says which leaves are ternary.
  _, params = init()
  tx = ec2t.ternarize_transform(selection=lambda path, leaf: path == "Conv_1/kernel")
  state = tx.init(params)
  updates, _ = tx.update(_grads(), state, params)
  new = optax.apply_updates(params, updates)
  assert len(np.unique(np.asarray(new["Conv_1"]["kernel"]))) <= 3
  assert len(np.unique(np.asarray(new["Conv_2"]["kernel"]))) > 3


class SnapToGridTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_differences_of_snapped_values_are_exact(self):
    rng = np.random.default_rng(0)
    for dtype in (jnp.float32, jnp.bfloat16):
      for _ in range(50):
        old = self.variant(core.snap_to_grid, static_argnums=1)(
            jnp.asarray(rng.uniform(0.01, 1.0, 2)), dtype)
        new = self.variant(core.snap_to_grid, static_argnums=1)(
            jnp.asarray(old * rng.uniform(0.6, 1.0, 2)), dtype)
        for a in (old[0], -old[1], 0.0):
          for b in (new[0], -new[1], 0.0):
            a_, b_ = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
            np.testing.assert_array_equal(a_ + (b_ - a_), b_)

  def test_change_is_at_most_half_the_quantum_of_the_largest_value(self):
    # max 0.98 < 2^0, so the float32 quantum is 2^(0 - 24 + 2) = 2^-22.
    x = jnp.asarray([0.123456789, 0.987654321], jnp.float32)
    snapped = core.snap_to_grid(x, jnp.float32)
    assert float(jnp.max(jnp.abs(snapped - x))) <= 2.0 ** -23
    np.testing.assert_array_equal(snapped / 2.0 ** -22,
                                  jnp.round(snapped / 2.0 ** -22))


def test_set_phase_rejects_negative_and_non_integer_phases():
  _, params = init()
  state = ec2t.ternarize_transform().init(params)
  for bad in (-1, 1.5, True):
    with pytest.raises(ValueError, match="phase must be an int >= 0"):
      ec2t.set_phase(state, bad)
  assert int(ec2t.set_phase(state, 2).phase) == 2


def test_freeze_assignment_is_phase_one():
  _, params = init()
  state = ec2t.freeze_assignment(ec2t.ternarize_transform().init(params))
  assert int(state.phase) == 1 and bool(ec2t.is_frozen(state))
  assert int(ec2t.freeze_assignment(state, False).phase) == 0


def test_state_does_not_alias_the_params_buffers():
  _, params = init()
  state = ec2t.ternarize_transform().init(params)
  latent = state.latent["Conv_1"]["kernel"]
  assert (latent.unsafe_buffer_pointer()
          != params["Conv_1"]["kernel"].unsafe_buffer_pointer())
