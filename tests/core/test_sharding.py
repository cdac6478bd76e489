"""Sharded EC2T steps equal unsharded ones; the state follows the params."""

import chex
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import optax
import pytest

import ec2t_jax as ec2t
from models_for_tests import batch, init, loss_fn


def _shard_params(params, mesh):
  """Shards every kernel's output dimension over 'model' (FSDP-like)."""
  def spec(x):
    if x.ndim >= 2 and x.shape[-1] % mesh.shape["model"] == 0:
      return NamedSharding(mesh, P(*([None] * (x.ndim - 1)), "model"))
    return NamedSharding(mesh, P())
  return jax.tree.map(lambda x: jax.device_put(x, spec(x)), params)


@pytest.mark.parametrize("make_tx", [
    lambda: optax.chain(optax.adam(1e-2), ec2t.ternarize_transform(gamma=0.2)),
    lambda: ec2t.reference_optimizer(gamma=0.2, latent_learning_rate=1e-2),
], ids=["chain", "reference"])
def test_sharded_jitted_steps_equal_unsharded(make_tx):
  assert jax.device_count() == 8
  mesh = jax.make_mesh((2, 4), ("data", "model"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  model, params = init()
  tx = make_tx()

  def step(params, opt_state, x, y):
    grads = jax.grad(lambda p: loss_fn(model, p, x, y))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def run(params, sharded):
    if sharded:
      params = _shard_params(params, mesh)
    opt_state = jax.jit(tx.init)(params)
    params = jax.jit(ec2t.quantized_params)(params, opt_state)
    for i in range(3):
      x, y = batch(i)
      if sharded:
        x = jax.device_put(x, NamedSharding(mesh, P("data")))
        y = jax.device_put(y, NamedSharding(mesh, P("data")))
      params, opt_state = jax.jit(step)(params, opt_state, x, y)
    return params, opt_state

  params_1, state_1 = run(params, sharded=False)
  params_8, state_8 = run(params, sharded=True)
  chex.assert_trees_all_close(params_8, params_1, atol=1e-6, rtol=1e-6)
  core_1, core_8 = ec2t.find_quantizer_state(state_1), ec2t.find_quantizer_state(state_8)
  # The batch is sharded over "data": the gradients' sums change order, and Adam's normalised
  # step (m / sqrt(v)) magnifies that where a gradient is near zero (up to ~8e-6 here, one
  # latent weight in 1152). The params and the assignments must still be equal.
  chex.assert_trees_all_close(core_8.latent, core_1.latent, atol=2e-5, rtol=1e-6)
  chex.assert_trees_all_equal(core_8.field("assignment"), core_1.field("assignment"))
  # The state's latent weights and assignments take the params' shardings.
  kernel = params_8["Conv_1"]["kernel"]
  assert kernel.sharding.spec == P(None, None, None, "model")
  for tree in (core_8.latent, core_8.field("assignment")):
    assert tree["Conv_1"]["kernel"].sharding.is_equivalent_to(
        kernel.sharding, kernel.ndim)
