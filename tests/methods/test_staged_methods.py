"""INQ, SLQ and MLQ transformations on the shared core: grids, exact landing, stages, Linen, NNX."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import ec2t_jax as ec2t
from ec2t_jax._src.methods import inq as inq_lib
from tests import models_for_tests as models

LAYERS = models.TERNARY_LEAVES


def _leaf(opt_state, name):
  return ec2t.find_quantizer_state(opt_state).resolved_leaves()[name]["kernel"]


def _run_steps(tx, steps, seed=0):
  """Steps one by one, checking exact landing of every apply_updates."""
  model, params = models.init()
  opt_state = tx.init(params)
  params = ec2t.quantized_params(params, opt_state)

  @jax.jit
  def step(params, opt_state, x, y):
    grads = jax.grad(lambda p: models.loss_fn(model, p, x, y))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  history = []
  for i in range(steps):
    params, opt_state = step(params, opt_state, *models.batch(seed + i))
    chex_equal(params, ec2t.quantized_params(params, opt_state))
    history.append(opt_state)
  return params, opt_state, history


def chex_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("bits", [2, 5])
def test_inq_lands_exactly_and_ends_on_the_codebook(bits):
  tx = optax.chain(optax.adam(1e-2), ec2t.inq(bits, steps_per_stage=2))
  params, opt_state, history = _run_steps(tx, 8)
  for name in LAYERS:
    leaf = _leaf(opt_state, name)
    assert bool(leaf.frozen.all()) and int(leaf.stage) == 3
    kernel = np.asarray(params[name]["kernel"])
    book = np.asarray(inq_lib.inq_codebook(0.0, bits))  # shape only
    n1 = int(leaf.n1)
    allowed = {0.0} | {s * 2.0 ** (n1 - j) for s in (1, -1)
                       for j in range(inq_lib.num_magnitudes(bits))}
    assert set(np.unique(kernel).tolist()) <= allowed, name
    assert len(book) == 2 * inq_lib.num_magnitudes(bits) + 1
  # The official portions by stage (0.3, 0.6, 0.8, 1): one stage every 2 steps.
  fractions = [float(_leaf(s, "Conv_1").frozen.mean()) for s in history]
  p = inq_lib.OFFICIAL_PORTIONS
  np.testing.assert_allclose(fractions[:7], [p[0], p[0], p[1], p[1], p[2], p[2], p[3]],
                             atol=1 / 1152)


def test_inq_frozen_weights_never_move_and_free_ones_train():
  tx = optax.chain(optax.adam(1e-2), ec2t.inq(5))  # stages by phase only
  model, params = models.init()
  opt_state = tx.init(params)
  first = _leaf(opt_state, "Dense_0")
  params = ec2t.quantized_params(params, opt_state)
  grads = jax.grad(lambda p: models.loss_fn(model, p, *models.batch(0)))(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  new = optax.apply_updates(params, updates)["Dense_0"]["kernel"]
  old = params["Dense_0"]["kernel"]
  assert np.all(np.asarray(new)[np.asarray(first.frozen)] == np.asarray(old)[np.asarray(first.frozen)])
  free = ~np.asarray(first.frozen) & (np.asarray(grads["Dense_0"]["kernel"]) != 0)
  assert free.sum() > 100 and np.all(np.asarray(new)[free] != np.asarray(old)[free])
  assert int(_leaf(opt_state, "Dense_0").stage) == 0


def test_set_phase_advances_the_stage():
  tx = optax.chain(optax.adam(1e-2), ec2t.inq(3))
  model, params = models.init()
  opt_state = jax.jit(tx.init)(params)
  params = ec2t.quantized_params(params, opt_state)
  opt_state = ec2t.set_phase(opt_state, 2)
  grads = jax.grad(lambda p: models.loss_fn(model, p, *models.batch(0)))(params)
  updates, opt_state = jax.jit(tx.update)(grads, opt_state, params)
  leaf = _leaf(opt_state, "Conv_2")
  assert int(leaf.stage) == 2
  assert float(leaf.frozen.mean()) == pytest.approx(0.8, abs=1e-3)  # official portions


def test_slq_lands_exactly_on_its_levels():
  tx = optax.chain(optax.adam(1e-2), ec2t.slq(3, steps_per_stage=2))
  params, opt_state, _ = _run_steps(tx, 8)
  for name in LAYERS:
    leaf = _leaf(opt_state, name)
    assert bool(leaf.frozen.all())
    levels = set(np.asarray(leaf.levels).tolist())
    assert len(levels) <= 7 and 0.0 in levels
    assert set(np.unique(np.asarray(params[name]["kernel"])).tolist()) <= levels


def test_mlq_is_ternary_and_layers_start_one_stage_apart():
  tx = optax.chain(optax.adam(1e-2), ec2t.mlq((0.5, 1.0), steps_per_stage=2))
  params, opt_state, history = _run_steps(tx, 9)
  # Forward order of the SmallCNN: Conv_1, Conv_2, Dense_0 -> ranks 0, 1, 2.
  stages = [[int(_leaf(s, n).stage) for n in LAYERS] for s in history]
  assert stages[0] == [0, -1, -1]  # after step 1 (count 0 -> stage 0)
  assert stages[2] == [1, 0, -1]   # steps // 2 = 1
  assert stages[4] == [1, 1, 0]
  assert stages[-1] == [1, 1, 1]
  for name in LAYERS:
    values = np.unique(np.asarray(params[name]["kernel"]))
    assert len(values) <= 3 and 0.0 in values
  # Before its first stage a later layer is still full precision.
  first = history[0]
  assert not bool(_leaf(first, "Dense_0").frozen.any())


def test_nnx_optimizer_with_inq_and_mlq():
  for method in (ec2t.inq(2, steps_per_stage=1), ec2t.mlq(steps_per_stage=1)):
    model = models.SmallNnxCNN(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.chain(optax.adam(1e-2), method), wrt=nnx.Param)
    nnx.update(model, ec2t.quantized_params(nnx.state(model, nnx.Param), optimizer))

    @nnx.jit
    def step(model, optimizer, x, y):
      loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
      grads = nnx.grad(loss_fn)(model)
      optimizer.update(model, grads)

    for i in range(5):
      x, y = models.batch(i)
      step(model, optimizer, x, y)
    for kernel in (model.conv2.kernel[...], model.fc1.kernel[...]):
      values = np.unique(np.asarray(kernel))
      assert len(values) <= 3 and 0.0 in values
    params = nnx.state(model, nnx.Param)
    chex_equal(nnx.as_pure(params), ec2t.quantized_params(params, optimizer))


@pytest.mark.parametrize("make,message", [
    (lambda: ec2t.inq(1), "bits"),
    (lambda: ec2t.inq(5, (0.5, 0.4, 1.0)), "increasing"),
    (lambda: ec2t.inq(5, (0.5, 0.9)), "end at 1"),
    (lambda: ec2t.slq(9), "bits"),
    (lambda: ec2t.mlq((0.5,)), "end at 1"),
    (lambda: ec2t.inq(5, steps_per_stage=-1), "steps_per_stage"),
])
def test_bad_arguments_named(make, message):
  with pytest.raises(ValueError, match=message):
    make()
