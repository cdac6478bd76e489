"""ternarize_transform: the chain form of EC2T."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ec2t_jax as ec2t
from models_for_tests import batch, init, loss_fn, SmallCNN, TERNARY_LEAVES, train


def _distinct(array):
  return set(np.asarray(array, np.float32).ravel().tolist())


class TernarizeTransformTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_update_lands_exactly_on_the_ternary_values(self):
    model, params = init()
    tx = optax.chain(optax.adam(1e-2), ec2t.ternarize_transform(gamma=0.3))
    state = tx.init(params)
    params = ec2t.quantized_params(params, state)
    x, y = batch()
    grads = jax.grad(lambda p: loss_fn(model, p, x, y))(params)
    updates, state = self.variant(tx.update)(grads, state, params)
    params = optax.apply_updates(params, updates)
    chex.assert_trees_all_equal(params, ec2t.quantized_params(params, state))
    for name in TERNARY_LEAVES:
      assert len(_distinct(params[name]["kernel"])) <= 3


def test_jit_and_eager_updates_agree():
  model, params = init()
  tx = optax.chain(optax.adam(1e-2), ec2t.ternarize_transform(gamma=0.2))
  state = tx.init(params)
  x, y = batch()
  grads = jax.grad(lambda p: loss_fn(model, p, x, y))(params)
  chex.assert_trees_all_close(jax.jit(tx.update)(grads, state, params),
                              tx.update(grads, state, params), atol=1e-6)


def test_first_forward_is_ternary_after_ternary_params():
  _, params = init()
  tx = optax.chain(optax.adam(1e-3), ec2t.ternarize_transform())
  params = ec2t.quantized_params(params, tx.init(params))
  for name in TERNARY_LEAVES:
    assert len(_distinct(params[name]["kernel"])) == 3
  assert len(_distinct(params["Conv_0"]["kernel"])) > 3


def test_unselected_leaves_get_exactly_the_inner_update():
  model, params = init()
  inner = optax.adam(1e-2)
  tx = optax.chain(inner, ec2t.ternarize_transform(gamma=0.2))
  x, y = batch()
  grads = jax.grad(lambda p: loss_fn(model, p, x, y))(params)
  updates, _ = tx.update(grads, tx.init(params), params)
  expected, _ = inner.update(grads, inner.init(params), params)
  for name in ("Conv_0", "Dense_1"):
    chex.assert_trees_all_equal(updates[name], expected[name])
  for name in TERNARY_LEAVES:
    chex.assert_trees_all_equal(updates[name]["bias"], expected[name]["bias"])


def _one_sgd_step(lr, **kwargs):
  """One SGD step through ternarize_transform: (grads, old core, new core)."""
  model, params = init()
  tx = optax.chain(optax.sgd(lr), ec2t.ternarize_transform(**kwargs))
  state = tx.init(params)
  params = ec2t.quantized_params(params, state)
  x, y = batch()
  grads = jax.grad(lambda p: loss_fn(model, p, x, y))(params)
  _, new_state = jax.jit(tx.update)(grads, state, params)
  return (grads, ec2t.find_quantizer_state(state),
          ec2t.find_quantizer_state(new_state))


def test_latent_weights_move_by_the_update_by_default():
  lr = 0.1
  grads, old, new = _one_sgd_step(lr, gamma=0.2)
  for name in TERNARY_LEAVES:
    np.testing.assert_allclose(new.latent[name]["kernel"],
                               old.latent[name]["kernel"] - lr * grads[name]["kernel"],
                               rtol=1e-5, atol=1e-7)


def test_ttq_latent_step_moves_latent_weights_by_the_scaled_update():
  lr = 0.1
  grads, old, new = _one_sgd_step(lr, gamma=0.2, latent_step="ttq")
  for name in TERNARY_LEAVES:
    a = old.field("assignment")[name]["kernel"]
    w_n, w_p = old.field("w_n")[name]["kernel"], old.field("w_p")[name]["kernel"]
    g = grads[name]["kernel"]
    scale = np.where(a > 0, w_p, np.where(a < 0, w_n, 1.0))
    np.testing.assert_allclose(new.latent[name]["kernel"],
                               old.latent[name]["kernel"] - lr * scale * g,
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kwargs,k", [({"centroid_update_scale": 1.0}, 1.0),
                                      ({}, 0.1)], ids=["k=1", "default k=0.1"])
def test_centroids_move_by_k_times_the_mean_update_of_their_cluster(kwargs, k):
  lr = 0.5
  grads, old, new = _one_sgd_step(lr, gamma=0.0, floor_factor=0.0, **kwargs)
  for name in TERNARY_LEAVES:
    a = np.asarray(old.field("assignment")[name]["kernel"])
    u = -lr * np.asarray(grads[name]["kernel"])
    np.testing.assert_allclose(new.field("w_p")[name]["kernel"],
                               old.field("w_p")[name]["kernel"] + k * u[a > 0].mean(),
                               rtol=1e-5)
    np.testing.assert_allclose(new.field("w_n")[name]["kernel"],
                               old.field("w_n")[name]["kernel"] - k * u[a < 0].mean(),
                               rtol=1e-5)


def test_training_lowers_the_loss():
  model, params = init()
  tx = optax.chain(optax.adam(3e-3), ec2t.ternarize_transform(gamma=0.1))
  x, y = batch()
  opt_state = tx.init(params)
  params = ec2t.quantized_params(params, opt_state)

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(lambda p: loss_fn(model, p, x, y))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for _ in range(60):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  assert losses[-1] < 0.8 * losses[0]


def test_gamma_one_is_sparser_than_gamma_zero():
  model, params = init()
  sparsity = {}
  for gamma in (0.0, 1.0):
    tx = optax.chain(optax.adam(1e-3), ec2t.ternarize_transform(gamma=gamma))
    _, state, _ = train(model, params, tx, steps=3)
    sparsity[gamma] = ec2t.summary(state).totals["sparsity"]
  assert sparsity[1.0] > sparsity[0.0] + 0.05


def test_bfloat16_params_keep_their_dtype_and_float32_latents():
  model, params = init(SmallCNN(dtype=jnp.bfloat16))
  tx = optax.chain(optax.adam(1e-3), ec2t.ternarize_transform(gamma=0.2))
  params, state, losses = train(model, params, tx, steps=3)
  chex.assert_trees_all_equal_dtypes(params, jax.tree.map(
      lambda p: p.astype(jnp.bfloat16), params))
  core = ec2t.find_quantizer_state(state)
  assert core.latent["Conv_1"]["kernel"].dtype == jnp.float32
  chex.assert_trees_all_equal(params, ec2t.quantized_params(params, state))
  assert all(np.isfinite(losses))


def test_inject_hyperparams_changes_gamma_without_reinit():
  model, params = init()
  tx = optax.chain(optax.adam(1e-3), optax.inject_hyperparams(
      ec2t.ternarize_transform)(gamma=0.0))
  opt_state = tx.init(params)
  params = ec2t.quantized_params(params, opt_state)
  x, y = batch()
  grads = jax.grad(lambda p: loss_fn(model, p, x, y))(params)
  update = jax.jit(tx.update)  # gamma is traced: one compilation serves both
  _, low = update(grads, opt_state, params)
  opt_state[1].hyperparams["gamma"] = jnp.asarray(1.0)
  _, high = update(grads, opt_state, params)
  assert (ec2t.summary(high).totals["sparsity"]
          > ec2t.summary(low).totals["sparsity"] + 0.05)


def test_ecp_leaf_keeps_latent_values_where_not_pruned():
  model, params = init()
  tx = optax.chain(optax.adam(1e-3), ec2t.ternarize_transform(
      gamma=0.5, selection=[ec2t.Rule("Dense_0/kernel", mode="ecp")]))
  params, state, _ = train(model, params, tx, steps=3)
  core = ec2t.find_quantizer_state(state)
  kernel = np.asarray(params["Dense_0"]["kernel"])
  latent = np.asarray(core.latent["Dense_0"]["kernel"])
  kept = np.asarray(core.field("assignment")["Dense_0"]["kernel"]) != 0
  assert 0 < kept.mean() < 1
  np.testing.assert_array_equal(kernel[~kept], 0.0)
  np.testing.assert_allclose(kernel[kept], latent[kept], rtol=1e-6)
  assert len(_distinct(params["Conv_1"]["kernel"])) <= 3


def test_frozen_assignment_keeps_latents_and_assignment_while_centroids_train():
  model, params = init()
  inner = optax.adam(1e-2)
  tx = optax.chain(inner, ec2t.ternarize_transform(gamma=0.2))
  params, state, _ = train(model, params, tx, steps=2)
  frozen = ec2t.freeze_assignment(state)
  assert bool(ec2t.is_frozen(frozen))
  x, y = batch(7)
  grads = jax.grad(lambda p: loss_fn(model, p, x, y))(params)
  updates, after = tx.update(grads, frozen, params)
  before, after_core = ec2t.find_quantizer_state(frozen), ec2t.find_quantizer_state(after)
  chex.assert_trees_all_equal(after_core.latent, before.latent)
  chex.assert_trees_all_equal(after_core.field("assignment"), before.field("assignment"))
  assert any(float(after_core.field("w_p")[n]["kernel"]) != float(before.field("w_p")[n]["kernel"])
             for n in TERNARY_LEAVES)
  # The inner optimizer's state keeps going, unselected leaves keep training.
  assert int(after[0][0].count) == int(state[0][0].count) + 1
  assert float(jnp.abs(updates["Conv_0"]["kernel"]).max()) > 0


def test_unfreezing_resumes_reassignment():
  model, params = init()
  tx = optax.chain(optax.adam(5e-2), ec2t.ternarize_transform(gamma=0.2))
  params, state, _ = train(model, params, tx, steps=1)
  state = ec2t.freeze_assignment(ec2t.freeze_assignment(state), frozen=False)
  assert not bool(ec2t.is_frozen(state))
  x, y = batch(3)
  grads = jax.grad(lambda p: loss_fn(model, p, x, y))(params)
  _, after = tx.update(grads, state, params)
  changed = [n for n in TERNARY_LEAVES if not np.array_equal(
      ec2t.find_quantizer_state(after).latent[n]["kernel"],
      ec2t.find_quantizer_state(state).latent[n]["kernel"])]
  assert changed


def test_state_has_the_params_structure_with_none_for_unselected_leaves():
  _, params = init()
  state = ec2t.ternarize_transform().init(params)
  assert state.latent["Conv_0"]["kernel"] is None
  assert state.latent["Conv_1"]["bias"] is None
  chex.assert_shape(state.latent["Conv_1"]["kernel"],
                    params["Conv_1"]["kernel"].shape)
  assert state.field("assignment")["Conv_1"]["kernel"].dtype == jnp.int8


@pytest.mark.parametrize("jit", [True, False])
def test_nonfinite_updates_keep_the_leaf_state_and_are_counted(jit):
  _, params = init()
  tx = ec2t.ternarize_transform(gamma=0.2)
  state = tx.init(params)
  params = ec2t.quantized_params(params, state)
  updates = jax.tree.map(jnp.zeros_like, params)
  updates["Conv_1"]["kernel"] = updates["Conv_1"]["kernel"].at[0, 0, 0, 0].set(
      jnp.nan)
  update = jax.jit(tx.update) if jit else tx.update
  new_updates, new_state = update(updates, state, params)
  assert int(new_state.nonfinite_count) == 1
  chex.assert_trees_all_equal(new_state.latent["Conv_1"], state.latent["Conv_1"])
  new_params = optax.apply_updates(params, new_updates)
  chex.assert_tree_all_finite(new_params["Conv_1"]["kernel"])
  chex.assert_trees_all_equal(new_params["Conv_1"]["kernel"],
                              params["Conv_1"]["kernel"])


@pytest.mark.parametrize("value", [0.0, 0.05, -0.05])
def test_constant_layer_stays_finite(value):
  model, params = init()
  params["Conv_1"]["kernel"] = jnp.full_like(params["Conv_1"]["kernel"], value)
  tx = optax.chain(optax.adam(1e-2), ec2t.ternarize_transform(gamma=0.2))
  params, state, losses = train(model, params, tx, steps=4)
  core = ec2t.find_quantizer_state(state)
  chex.assert_tree_all_finite((params, core.latent, core.field("w_n"), core.field("w_p"), core.field("lam")))
  assert all(np.isfinite(losses))
  chex.assert_trees_all_equal(params, ec2t.quantized_params(params, state))


def test_constant_nonzero_layer_keeps_training():
  model, params = init()
  params["Conv_1"]["kernel"] = jnp.full_like(params["Conv_1"]["kernel"], 0.05)
  tx = optax.chain(optax.adam(1e-2), ec2t.ternarize_transform(gamma=0.2))
  _, state, _ = train(model, params, tx, steps=4)
  latent = ec2t.find_quantizer_state(state).latent["Conv_1"]["kernel"]
  assert float(jnp.std(latent)) > 0
