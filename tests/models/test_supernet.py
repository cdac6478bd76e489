"""Function-preserving super-network transfer (ec2t_jax.models.supernet)."""

import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ec2t_jax import models

REFERENCE_FP = (pathlib.Path(__file__).resolve().parents[2]
                / "../shared/data/ec2t-reference/resnet20_fp.npz")


def _randomised(model, seed=0):
  """Variables of ``model`` with random BN scales, biases and running statistics.

  Freshly initialised batch norms (scale 1, bias 0, mean 0, var 1) would hide
  mistakes in how statistics are copied, so every BN leaf is made random.
  """
  variables = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, 8, 8, 3)))
  rng = np.random.default_rng(seed)

  def randomise(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    leaf = np.asarray(leaf)
    if name in ("scale", "var"):
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    if name in ("bias", "mean"):
      return rng.normal(0.0, 0.3, leaf.shape).astype(np.float32)
    return leaf

  return jax.tree_util.tree_map_with_path(randomise, variables)


def _images(seed=1, n=4, size=8):
  # 8x8 images keep the tests fast; the transfer does not depend on the image size.
  return jax.random.normal(jax.random.key(seed), (n, size, size, 3))


def _logits(model, variables, images, train):
  if train:
    return model.apply(variables, images, train=True, mutable=["batch_stats"])[0]
  return model.apply(variables, images)


@pytest.fixture(scope="module")
def resnet8():
  base = models.cifar_resnet(8)
  return base, _randomised(base)


@pytest.mark.parametrize("depth_multiplier,width_multiplier", [
    (1.4, 1.2),
    pytest.param(1.0, 1.2, marks=pytest.mark.slow),
    pytest.param(1.4, 1.0, marks=pytest.mark.slow),
    pytest.param(3.0, 1.5, marks=pytest.mark.slow)])
@pytest.mark.parametrize("train", [False, True], ids=["running_stats", "batch_stats"])
def test_supernet_computes_the_pretrained_function(resnet8, depth_multiplier, width_multiplier,
                                                   train):
  base, variables = resnet8
  supernet, wide = models.scale_pretrained_resnet(
      base, variables, depth_multiplier=depth_multiplier, width_multiplier=width_multiplier,
      noise=0.0)
  images = _images()
  chex.assert_trees_all_close(_logits(supernet, wide, images, train),
                              _logits(base, variables, images, train), atol=1e-4)


def test_supernet_has_the_scaled_shape(resnet8):
  base, variables = resnet8
  supernet, wide = models.scale_pretrained_resnet(base, variables, depth_multiplier=1.4,
                                                  width_multiplier=1.2, noise=0.0)
  assert supernet.blocks_per_stage == (2, 2, 2)
  assert supernet.stage_features == (16, 40, 80)
  expected = jax.eval_shape(lambda: supernet.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  chex.assert_trees_all_equal_shapes(wide, expected)


def test_widened_channels_are_copies_with_divided_consumers(resnet8):
  base, variables = resnet8
  _, wide = models.scale_pretrained_resnet(base, variables, width_multiplier=2.0,
                                           depth_multiplier=1.0, noise=0.0)
  # Stage 1 goes 16 -> 32: channels 16..31 copy 0..15, so the classifier rows halve.
  old = np.asarray(variables["params"]["linear"]["kernel"])
  new = wide["params"]["linear"]["kernel"]
  assert new.shape == (128, 10)
  np.testing.assert_allclose(new.sum(axis=0), old.sum(axis=0), rtol=1e-5, atol=1e-6)
  hidden_mean = np.asarray(variables["batch_stats"]["layer1_0"]["bn1"]["mean"])
  np.testing.assert_array_equal(wide["batch_stats"]["layer1_0"]["bn1"]["mean"],
                                np.concatenate([hidden_mean, hidden_mean]))


def test_inserted_blocks_start_as_identities(resnet8):
  base, variables = resnet8
  supernet, wide = models.scale_pretrained_resnet(base, variables, depth_multiplier=2.0,
                                                  width_multiplier=1.0, noise=0.0)
  assert supernet.blocks_per_stage == (2, 2, 2)
  # Pretrained block 0 stays first; the inserted block 1 has a zero second BN scale.
  np.testing.assert_array_equal(wide["params"]["layer2_0"]["conv1"]["kernel"],
                                variables["params"]["layer2_0"]["conv1"]["kernel"])
  assert not np.any(wide["params"]["layer2_1"]["bn2"]["scale"])
  assert np.any(wide["params"]["layer2_1"]["conv1"]["kernel"])


@pytest.mark.slow  # option B builds and compares a second pair of networks (~7 s)
def test_option_b_shortcuts_are_widened_too():
  base = models.cifar_resnet(8, shortcut="B")
  variables = _randomised(base)
  supernet, wide = models.scale_pretrained_resnet(base, variables, depth_multiplier=1.5,
                                                  width_multiplier=1.5, noise=0.0)
  images = _images()
  for train in (False, True):
    chex.assert_trees_all_close(_logits(supernet, wide, images, train),
                                _logits(base, variables, images, train), atol=1e-4)


def test_noise_breaks_the_symmetry_of_copied_channels_but_stays_small(resnet8):
  base, variables = resnet8
  supernet, wide = models.scale_pretrained_resnet(base, variables, depth_multiplier=1.0,
                                                  width_multiplier=2.0, noise=0.01, key=3)
  kernel = np.asarray(wide["params"]["layer1_0"]["conv1"]["kernel"])
  assert not np.allclose(kernel[..., :16], kernel[..., 16:])  # copies differ
  exact = base.apply(variables, _images())
  noisy = supernet.apply(wide, _images())
  assert 0 < float(jnp.max(jnp.abs(noisy - exact))) < 0.1 * float(jnp.max(jnp.abs(exact)))


def test_widened_network_still_trains(resnet8):
  base, variables = resnet8
  supernet, wide = models.scale_pretrained_resnet(base, variables, depth_multiplier=1.4,
                                                  width_multiplier=1.2, noise=0.01)
  images = _images(n=16)
  labels = jnp.arange(16) % 10
  tx = optax.adam(3e-3)

  def loss_fn(params, batch_stats):
    logits, updated = supernet.apply({"params": params, "batch_stats": batch_stats}, images,
                                     train=True, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updated

  @jax.jit
  def step(params, batch_stats, opt_state):
    (loss, updated), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), updated["batch_stats"], opt_state, loss

  params, batch_stats = wide["params"], wide["batch_stats"]
  opt_state = tx.init(params)
  losses = []
  for _ in range(8):
    params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state)
    losses.append(float(loss))
  assert losses[-1] < 0.7 * losses[0], losses
  # The inserted identity blocks left their zero start.
  assert np.any(np.asarray(params["layer1_1"]["bn2"]["scale"]))


def test_cifar_resnet_from_params_reads_the_architecture():
  model = models.cifar_resnet(32, num_classes=100, width_multiplier=1.5, shortcut="B")
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  found = models.cifar_resnet_from_params(shapes["params"])
  assert (found.blocks_per_stage, found.stage_features, found.num_classes, found.shortcut) == (
      (5, 5, 5), (24, 48, 96), 100, "B")


@pytest.mark.skipif(not REFERENCE_FP.exists(), reason=f"{REFERENCE_FP} not available")
def test_official_resnet20_transfers_to_the_micronet_factors():
  params, batch_stats = models.load_torch_checkpoint(REFERENCE_FP)
  base = models.cifar_resnet_from_params(params)
  variables = {"params": params, "batch_stats": batch_stats}
  supernet, wide = models.scale_pretrained_resnet(base, variables, depth_multiplier=1.4,
                                                  width_multiplier=1.2, noise=0.0)
  assert supernet.blocks_per_stage == (5, 5, 5)
  images = _images(n=4, size=32)
  chex.assert_trees_all_close(supernet.apply(wide, images), base.apply(variables, images),
                              atol=1e-4)


@pytest.mark.parametrize("kwargs,match", [
    ({"depth_multiplier": 0.5}, "depth_multiplier must be >= 1"),
    ({"width_multiplier": 0.9}, "width_multiplier must be >= 1"),
    ({"width_multiplier": float("nan")}, "width_multiplier must be >= 1"),
    ({"noise": -0.1}, "noise must be >= 0"),
])
def test_bad_scaling_arguments_are_rejected_by_name(resnet8, kwargs, match):
  base, variables = resnet8
  with pytest.raises(ValueError, match=match):
    models.scale_pretrained_resnet(base, variables, **kwargs)


@pytest.mark.parametrize("target_kwargs,match", [
    ({"stage_features": (16, 24, 64)}, r"target.stage_features.*stage 2 has 24 channels"),
    ({"stage_features": (24, 32, 64)}, r"target.stage_features.*stage 2 must add at least 16"),
    ({"blocks_per_stage": (1, 0, 1)}, r"target.blocks_per_stage.*stage 2 has 0 blocks"),
    ({"num_classes": 100}, r"target.num_classes=100"),
])
def test_unreachable_targets_are_rejected_by_name(resnet8, target_kwargs, match):
  base, variables = resnet8
  with pytest.raises(ValueError, match=match):
    models.transfer_to_supernet(base, variables, base.clone(**target_kwargs), noise=0.0)
