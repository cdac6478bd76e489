"""Post-training pruning with layer-wise calibration: pure steps, Linen and NNX, bad input."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ec2t_jax as ec2t
from ec2t_jax._src.methods.calibrated_pruning import pruning as cp
from ec2t_jax._src.methods._support import layer_capture
from tests import models_for_tests as models


@pytest.fixture(scope="module")
def linen():
  model, params = models.init()
  x = jax.random.normal(jax.random.key(3), (32, 8, 8, 1))
  apply_fn = lambda p, x: model.apply({"params": p}, x)
  return model, params, apply_fn, x


@pytest.fixture(scope="module")
def linen_pruned(linen):
  _, params, apply_fn, x = linen
  return cp.prune_calibrated(params, apply_fn, x, 0.6, steps_per_level=10,
                             weight_learning_rate=1e-3, bias_learning_rate=1e-3,
                             return_report=True)


def test_global_masks_by_hand():
  # Normalised scores: [0.6, 0.8] and [~0.995, 0, ~0.0995]; prune round(0.4*5) = 2 smallest.
  masks = cp.global_magnitude_masks([jnp.array([3., 4.]), jnp.array([1., 0., 0.1])], 0.4)
  np.testing.assert_array_equal(masks[0], [True, True])
  np.testing.assert_array_equal(masks[1], [True, False, False])


def test_global_masks_count_and_threshold():
  kernels = [jax.random.normal(jax.random.key(i), s) for i, s in enumerate([(5, 7), (30,), (3, 3, 4)])]
  masks = cp.global_magnitude_masks(kernels, 0.7)
  total = sum(k.size for k in kernels)
  assert sum(int((~m).sum()) for m in masks) == round(0.7 * total)
  kept = np.concatenate([np.abs(k[m]) / np.linalg.norm(k) for k, m in zip(kernels, masks)])
  pruned = np.concatenate([np.abs(k[~m]) / np.linalg.norm(k) for k, m in zip(kernels, masks)])
  assert kept.min() >= pruned.max()


class StatisticsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_channel_mean_and_std_restored(self):
    dense = jax.random.normal(jax.random.key(0), (3, 3, 4, 6)) + 0.05
    mask = jnp.abs(dense) > 0.6
    corrected = self.variant(cp.correct_channel_statistics)(jnp.where(mask, dense, 0.), mask, dense)
    got = np.asarray(corrected).reshape(-1, 6)
    want = np.asarray(dense).reshape(-1, 6)
    np.testing.assert_allclose(got.mean(0), want.mean(0), atol=1e-5)
    np.testing.assert_allclose(got.std(0), want.std(0), rtol=1e-4)
    np.testing.assert_array_equal(got == 0, ~np.asarray(mask).reshape(-1, 6))


def test_bias_offset_by_hand():
  dense = [jnp.array([[1., 2.], [3., 4.]]), jnp.array([[5., 6.]])]
  pruned = [jnp.array([[0., 2.], [3., 1.]]), jnp.array([[5., 0.]])]
  # channel 0 differences 1, 0, 0 -> 1/3; channel 1: 0, 3, 6 -> 3.
  chex.assert_trees_all_close(cp.bias_offset(dense, pruned), jnp.array([1 / 3, 3.0]))


def test_capture_gives_the_layer_inputs(linen):
  model, params, apply_fn, x = linen
  leaves = jax.tree.leaves(params)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  dense0 = next(i for i, p in enumerate(paths) if "Dense_0" in p and "kernel" in p)
  conv1 = next(i for i, p in enumerate(paths) if "Conv_1" in p and "kernel" in p)
  calls, outputs = layer_capture.capture_layer_inputs(apply_fn, params, [x], [dense0, conv1])
  _, state = model.apply({"params": params}, x, capture_intermediates=True)
  inter = state["intermediates"]
  want_dense0 = jax.nn.relu(inter["Conv_2"]["__call__"][0]).mean((1, 2))
  want_conv1 = jax.nn.relu(inter["Conv_0"]["__call__"][0])
  chex.assert_trees_all_close(calls[dense0].inputs[0], want_dense0, atol=1e-6)
  chex.assert_trees_all_close(calls[conv1].inputs[0], want_conv1, atol=1e-6)
  chex.assert_trees_all_close(outputs[0][0], apply_fn(params, x), atol=1e-6)
  # Replaying the layer alone gives the module's own output (minus its bias).
  bias = params["Conv_1"]["bias"]
  chex.assert_trees_all_close(calls[conv1].output(calls[conv1].inputs[0], leaves[conv1]) + bias,
                              inter["Conv_1"]["__call__"][0], atol=1e-5)


def test_calibration_reduces_the_layer_output_error(linen):
  call, kernel, bias, mask, targets = _dense0_call(linen)
  plain = cp.layer_output_error(call, kernel, bias, targets)
  new_kernel, new_bias, (before, after) = cp.calibrate_layer(
      call, kernel, bias, mask, targets, steps=20, weight_learning_rate=1e-3,
      bias_learning_rate=1e-3)
  assert float(before) == pytest.approx(float(plain), rel=1e-5)
  assert float(after) < 0.9 * float(before)
  assert float(cp.layer_output_error(call, new_kernel, new_bias, targets)) == pytest.approx(
      float(after), rel=1e-4)
  np.testing.assert_array_equal(new_kernel == 0, ~mask)
  # A learning rate that diverges cannot make it worse: the best iterate is kept.
  _, _, (before, after) = cp.calibrate_layer(call, kernel, bias, mask, targets, steps=5,
                                             weight_learning_rate=10.0, bias_learning_rate=10.0)
  assert float(after) <= float(before)


def test_linen_prunes_the_selection_to_the_target(linen, linen_pruned):
  _, params, _, _ = linen
  pruned, reports = linen_pruned
  selected = [pruned[n]["kernel"] for n in models.TERNARY_LEAVES]
  zeros = sum(int((k == 0).sum()) for k in selected)
  assert zeros == round(0.6 * sum(k.size for k in selected))
  for name in ("Conv_0", "Dense_1"):  # the paper's rule keeps first and last
    chex.assert_trees_all_equal(pruned[name], params[name])
  for k in selected:
    assert not np.any(np.signbit(np.asarray(k)[np.asarray(k) == 0]))
  chex.assert_trees_all_equal_shapes_and_dtypes(pruned, params)
  assert [r.path for r in reports] == [f"{n}/kernel" for n in models.TERNARY_LEAVES]
  assert all(r.error_after <= r.error_before for r in reports)


def test_each_step_helps_the_model_output(linen, linen_pruned):
  _, params, apply_fn, x = linen
  pruned, _ = linen_pruned
  plain = jax.tree.map(lambda p, q: jnp.where(q == 0, 0.0, p) if p.ndim >= 2 else p,
                       params, pruned)
  dense_out = apply_fn(params, x)
  err = lambda p: float(jnp.mean((apply_fn(p, x) - dense_out) ** 2))
  assert err(pruned) < err(plain)


@pytest.mark.slow
def test_deterministic(linen, linen_pruned):
  _, params, apply_fn, x = linen
  again = cp.prune_calibrated(params, apply_fn, x, 0.6, steps_per_level=10,
                              weight_learning_rate=1e-3, bias_learning_rate=1e-3)
  chex.assert_trees_all_equal(again, linen_pruned[0])


class NnxMLP(nnx.Module):

  def __init__(self, rngs):
    self.layers = nnx.List([nnx.Linear(6, 16, rngs=rngs), nnx.Linear(16, 16, rngs=rngs),
                            nnx.Linear(16, 16, rngs=rngs), nnx.Linear(16, 3, rngs=rngs)])

  def __call__(self, x):
    for layer in self.layers[:-1]:
      x = nnx.relu(layer(x))
    return self.layers[-1](x)


def test_nnx_model():
  graphdef, state = nnx.split(NnxMLP(nnx.Rngs(0)))
  apply_fn = lambda s, x: nnx.merge(graphdef, s)(x)
  x = jax.random.normal(jax.random.key(1), (64, 6))
  pruned, reports = ec2t.prune_calibrated(state, apply_fn, [x[:32], x[32:]], 0.5,
                                          steps_per_level=5, return_report=True)
  assert isinstance(pruned, nnx.State)
  assert [r.path for r in reports] == ["layers/1/kernel", "layers/2/kernel"]
  kernels = [pruned["layers"][i]["kernel"][...] for i in (1, 2)]
  assert sum(int((k == 0).sum()) for k in kernels) == 256
  np.testing.assert_array_equal(pruned["layers"][0]["kernel"][...], state["layers"][0]["kernel"][...])
  model = nnx.merge(graphdef, pruned)
  assert model(x).shape == (64, 3)


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5, "a"])
def test_bad_sparsity_named(linen, sparsity):
  _, params, apply_fn, x = linen
  with pytest.raises(ValueError, match="sparsity"):
    ec2t.prune_calibrated(params, apply_fn, x, sparsity)


@pytest.mark.parametrize("data", [[], np.zeros((0, 8, 8, 1), np.float32), None])
def test_empty_calibration_data_named(linen, data):
  _, params, apply_fn, _ = linen
  with pytest.raises(ValueError, match="calibration_data"):
    ec2t.prune_calibrated(params, apply_fn, data, 0.5)


def test_failing_apply_fn_named(linen):
  _, params, apply_fn, _ = linen
  with pytest.raises(ValueError, match="apply_fn failed on the calibration batch"):
    ec2t.prune_calibrated(params, apply_fn, jnp.zeros((4, 8, 8, 3)), 0.5)


def test_leaf_not_used_by_a_layer_named(linen):
  _, params, _, x = linen
  model = models.SmallCNN()
  params = {**params, "extra": jnp.ones((3, 3))}
  apply_fn = lambda p, x: model.apply({"params": {k: v for k, v in p.items() if k != "extra"}}, x)
  with pytest.raises(ValueError, match="extra"):
    ec2t.prune_calibrated(params, apply_fn, x, 0.5,
                          selection=ec2t.Selection([ec2t.Rule("extra")], default="none"))


def test_default_budget_is_pots_30_iterations_of_40_steps_on_50_inputs():
  # The old default was 30 steps per level (steps_per_level=30).
  import inspect  # pylint: disable=g-import-not-at-top
  defaults = {k: v.default for k, v in inspect.signature(cp.prune_calibrated).parameters.items()}
  assert defaults["steps_per_level"] is None
  assert (defaults["tuning_iterations"], defaults["steps_per_iteration"],
          defaults["tuning_batch_size"]) == (30, 40, 50)


def _dense0_call(linen):
  _, params, apply_fn, x = linen
  leaves = jax.tree.leaves(params)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  i = next(j for j, p in enumerate(paths) if "Dense_0" in p and "kernel" in p)
  bias = params["Dense_0"]["bias"]
  calls, _ = layer_capture.capture_layer_inputs(apply_fn, params, [x[:16], x[16:]], [i])
  call = calls[i]
  targets = [call.output(b, leaves[i]) + bias for b in call.inputs]
  mask = cp.global_magnitude_masks([leaves[i]], 0.7)[0]
  return call, jnp.where(mask, leaves[i], 0.0), bias, mask, targets


def test_pot_schedule_one_full_batch_step_is_one_masked_adam_step(linen):
  # Oracle: optax.adam on the pooled output error, gradients masked, by hand.
  call, kernel, bias, mask, targets = _dense0_call(linen)
  calibrate = cp.make_pot_calibrator(call, True, iterations=1, steps_per_iteration=1,
                                     batch_size=32, weight_learning_rate=1e-2,
                                     bias_learning_rate=1e-2)
  new_kernel, new_bias, (before, after) = calibrate(kernel, bias, mask, targets)
  x, t = jnp.concatenate(call.inputs), jnp.concatenate(targets)
  loss = lambda k, b: jnp.mean((call.output(x, k) + b - t) ** 2)
  gk, gb = jax.grad(loss, argnums=(0, 1))(kernel, bias)
  import optax  # pylint: disable=g-import-not-at-top
  uk, _ = optax.adam(1e-2).update(gk * mask, optax.adam(1e-2).init(kernel))
  ub, _ = optax.adam(1e-2).update(gb, optax.adam(1e-2).init(bias))
  want_k, want_b = jnp.where(mask, kernel + uk, 0.0), bias + ub
  # POT keeps the last iterate; the first step always has its gradient (previous loss 0).
  np.testing.assert_allclose(new_kernel, want_k, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(new_bias, want_b, rtol=1e-5, atol=1e-7)
  assert float(before) == pytest.approx(float(loss(kernel, bias)), rel=1e-5)
  assert float(after) == pytest.approx(float(loss(want_k, want_b)), rel=1e-5)


def test_pot_schedule_reduces_the_error_and_keeps_the_mask(linen):
  call, kernel, bias, mask, targets = _dense0_call(linen)
  calibrate = cp.make_pot_calibrator(call, True, iterations=4, steps_per_iteration=5,
                                     batch_size=8, weight_learning_rate=1e-3,
                                     bias_learning_rate=1e-3, keep_best=True)
  new_kernel, _, (before, after) = calibrate(kernel, bias, mask, targets)
  assert float(after) < 0.95 * float(before)
  np.testing.assert_array_equal(new_kernel == 0, ~mask)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weight_is_refused_naming_the_leaf(linen, bad):
  _, params, apply_fn, x = linen
  broken = jax.tree.map(lambda v: v, params)
  broken["Dense_0"]["kernel"] = broken["Dense_0"]["kernel"].at[0, 0].set(bad)
  with pytest.raises(ValueError, match="Dense_0/kernel.*non-finite"):
    ec2t.prune_calibrated(broken, apply_fn, x, 0.5, steps_per_level=0)


def test_non_finite_calibration_data_is_refused_naming_the_batch(linen):
  _, params, apply_fn, x = linen
  with pytest.raises(ValueError, match="calibration_data batch 1 holds non-finite"):
    ec2t.prune_calibrated(params, apply_fn, [x[:16], x[16:].at[0].set(np.nan)], 0.5,
                          steps_per_level=0)


def _pot_sparsify_node(weights_oihw, pruned):
  """numpy transcription of POT's ``MagnitudeSparsity._sparsify_node`` correction
  (``correct_weight_bias``) for a kernel with output channels first."""
  sparse = weights_oihw.copy()
  sparse[pruned] = 0
  axis = tuple(range(1, weights_oihw.ndim))
  bcast = (...,) + (np.newaxis,) * (weights_oihw.ndim - 1)
  a = (np.std(weights_oihw, axis=axis) / (np.std(sparse, axis=axis) + 1e-9))[bcast]
  b = (np.mean(weights_oihw, axis=axis) - np.mean(sparse * a, axis=axis))[bcast]
  new = weights_oihw * a + b
  new[pruned] = 0
  return new


def test_pot_statistics_correction_matches_the_transcribed_pot_code():
  w = np.asarray(jax.random.normal(jax.random.key(3), (3, 3, 4, 5)) + 0.1, np.float32)
  keep = np.abs(w) > 0.8  # 80%-ish sparse channels
  got = np.asarray(cp.pot_channel_statistics(jnp.asarray(w), jnp.asarray(keep)))
  to_oihw = lambda x: np.transpose(x, (3, 2, 0, 1))
  np.testing.assert_allclose(to_oihw(got), _pot_sparsify_node(to_oihw(w), ~to_oihw(keep)),
                             rtol=1e-5, atol=1e-6)
  # POT's survivors differ from the exact restoration of mean and std.
  exact = np.asarray(cp.correct_channel_statistics(jnp.where(keep, w, 0.0), jnp.asarray(keep),
                                                   jnp.asarray(w)))
  assert np.max(np.abs(exact - got)) > 1e-3


def _adam_tx():
  import optax  # pylint: disable=g-import-not-at-top
  return optax.multi_transform({"kernel": optax.adam(0.1), "bias": optax.adam(0.1)},
                               {"kernel": "kernel", "bias": "bias"})


def test_pot_step_takes_a_gradient_only_when_the_loss_did_not_decrease():
  import optax  # pylint: disable=g-import-not-at-top
  variables = {"kernel": jnp.array([[1.0, 2.0], [0.0, -1.0]]), "bias": jnp.array([0.5, 0.0])}
  mask = jnp.array([[True, True], [False, True]])
  loss_fn = lambda v: jnp.sum((v["kernel"] - 0.3) ** 2) + jnp.sum(v["bias"] ** 2)
  tx = _adam_tx()
  state = tx.init(variables)
  # Step 1 (previous 0 <= loss): the masked gradient.
  v1, s1, l1 = cp.pot_tuning_step(loss_fn, tx, variables, state, jnp.float32(0.0), mask, True)
  g = jax.grad(loss_fn)(variables)
  u, want_state = tx.update({"kernel": g["kernel"] * mask, "bias": g["bias"]}, state, variables)
  want = optax.apply_updates(variables, u)
  np.testing.assert_allclose(v1["kernel"], jnp.where(mask, want["kernel"], 0.0), rtol=1e-6)
  np.testing.assert_allclose(v1["bias"], want["bias"], rtol=1e-6)
  assert float(l1) == pytest.approx(float(loss_fn(variables)))
  # Step 2 with a larger previous loss (the loss decreased): Adam steps on a zero gradient.
  v2, _, _ = cp.pot_tuning_step(loss_fn, tx, v1, s1, jnp.float32(1e9), mask, True)
  zero = jax.tree.map(jnp.zeros_like, v1)
  u2, _ = tx.update(zero, want_state, v1)
  want2 = optax.apply_updates(v1, u2)
  np.testing.assert_allclose(v2["kernel"], jnp.where(mask, want2["kernel"], 0.0), rtol=1e-6)
  np.testing.assert_allclose(v2["bias"], want2["bias"], rtol=1e-6)
  # ... and with increase_only=False the gradient is used anyway.
  v3, _, _ = cp.pot_tuning_step(loss_fn, tx, v1, s1, jnp.float32(1e9), mask, True,
                                increase_only=False)
  assert not np.allclose(v3["bias"], v2["bias"])


def test_unknown_statistics_correction_is_refused_by_name(linen):
  _, params, apply_fn, x = linen
  with pytest.raises(ValueError, match="statistics_correction must be one of"):
    ec2t.prune_calibrated(params, apply_fn, x, 0.5, steps_per_level=0,
                          statistics_correction=True)
