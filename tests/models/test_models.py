"""Specification of ec2t_jax.models: LeNets, CIFAR ResNets, super-networks, PyTorch import."""

import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ec2t_jax import models
from ec2t_jax.models import torch_convert

REFERENCE_FP = pathlib.Path(__file__).resolve().parents[2] / "../shared/data/ec2t-reference/resnet20_fp.npz"
needs_reference = pytest.mark.skipif(not REFERENCE_FP.exists(),
                                     reason=f"{REFERENCE_FP} not available")


def _init(model, shape):
  return model.init(jax.random.key(0), jnp.zeros(shape, jnp.float32))


def _param_count(variables):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))


# --------------------------------------------------------------------------- LeNets

def test_lenet5_has_two_convs_and_three_dense_layers_in_natural_order():
  variables = jax.eval_shape(lambda: _init(models.LeNet5(), (1, 28, 28, 1)))
  assert list(variables["params"]) == ["conv1", "conv2", "fc1", "fc2", "fc3"]
  chex.assert_shape(variables["params"]["fc1"]["kernel"], (16 * 5 * 5, 120))


def test_lenet5_has_the_classic_parameter_count():
  assert _param_count(jax.eval_shape(lambda: _init(models.LeNet5(), (1, 28, 28, 1)))) == 61706


def test_lenet300100_is_784_300_100_10():
  params = jax.eval_shape(lambda: _init(models.LeNet300100(), (1, 28, 28, 1)))["params"]
  shapes = [params[f"fc{i}"]["kernel"].shape for i in (1, 2, 3)]
  assert shapes == [(784, 300), (300, 100), (100, 10)]


@pytest.mark.parametrize("name", ["lenet5", "lenet300100"])
def test_lenet_forward_gives_logits_per_example(name):
  model = models.get_model(name, num_classes=10)
  logits = jax.jit(lambda x: model.apply(_init(model, (1, 28, 28, 1)), x))(jnp.ones((3, 28, 28, 1)))
  chex.assert_shape(logits, (3, 10))
  chex.assert_tree_all_finite(logits)


# --------------------------------------------------------------------------- ResNets

@pytest.mark.parametrize("depth,params", [(20, 269_722), (32, 464_154), (56, 853_018)])
def test_cifar_resnet_parameter_counts_match_the_option_a_reference(depth, params):
  model = models.cifar_resnet(depth, num_classes=10)
  shapes = jax.eval_shape(lambda: _init(model, (1, 32, 32, 3)))
  assert _param_count(shapes) == params


def test_cifar_resnet_rejects_depths_that_are_not_6n_plus_2():
  with pytest.raises(ValueError, match="6n\\+2"):
    models.cifar_resnet(21)


def test_option_a_resnet_has_no_shortcut_parameters():
  params = jax.eval_shape(lambda: _init(models.cifar_resnet(20), (1, 32, 32, 3)))["params"]
  assert not [k for block in params.values() if isinstance(block, dict) for k in block
              if k.startswith("shortcut")]


def test_option_b_resnet_adds_1x1_shortcut_convs_where_the_shape_changes():
  model = models.cifar_resnet(20, shortcut="B")
  params = jax.eval_shape(lambda: _init(model, (1, 32, 32, 3)))["params"]
  chex.assert_shape(params["layer2_0"]["shortcut_0"]["kernel"], (1, 1, 16, 32))
  assert "shortcut_0" not in params["layer1_0"]


def test_zero_pad_shortcut_subsamples_and_pads_channels_evenly():
  x = jnp.arange(2 * 4 * 4 * 2, dtype=jnp.float32).reshape(2, 4, 4, 2)
  y = models.zero_pad_shortcut(x, features=6, strides=2)
  chex.assert_shape(y, (2, 2, 2, 6))
  np.testing.assert_array_equal(y[..., 2:4], x[:, ::2, ::2, :])
  np.testing.assert_array_equal(y[..., :2], 0)
  np.testing.assert_array_equal(y[..., 4:], 0)


def test_basic_block_training_mode_updates_batch_stats():
  block = models.BasicBlock(features=8)
  images = jax.random.normal(jax.random.key(1), (4, 8, 8, 8))
  variables = jax.jit(lambda x: block.init(jax.random.key(0), x, train=False))(images)
  _, updates = jax.jit(lambda v, x: block.apply(v, x, train=True, mutable=["batch_stats"]))(
      variables, images)
  before = variables["batch_stats"]["bn1"]["mean"]
  assert not np.allclose(before, updates["batch_stats"]["bn1"]["mean"])


def test_supernet_defaults_reproduce_the_papers_8m_micronet_shape():
  model = models.compound_scaled_resnet(num_classes=100)
  assert model.blocks_per_stage == (23, 23, 23)
  assert tuple(model.stage_features) == (32, 64, 120)
  shapes = jax.eval_shape(lambda: _init(model, (1, 32, 32, 3)))
  assert 7.9e6 < _param_count(shapes) < 8.1e6


def test_width_and_depth_multipliers_scale_a_resnet():
  model = models.cifar_resnet(8, depth_multiplier=2.0, width_multiplier=1.5)
  assert model.blocks_per_stage == (2, 2, 2)
  assert tuple(model.stage_features) == (24, 48, 96)
  logits = jax.eval_shape(lambda: model.apply(_init(model, (1, 32, 32, 3)),
                                               jnp.zeros((2, 32, 32, 3))))
  chex.assert_shape(logits, (2, 10))


def test_get_model_names_the_known_models_when_the_name_is_unknown():
  with pytest.raises(ValueError, match="unknown model 'vgg16'.*resnet20"):
    models.get_model("vgg16", num_classes=10)


def test_default_ec2t_selection_would_skip_exactly_stem_and_classifier():
  """The paper rule ternarizes all kernels but the first and last in natural-sort order."""
  import re
  params = jax.eval_shape(lambda: _init(models.cifar_resnet(20), (1, 32, 32, 3)))["params"]
  paths = ["/".join(k.key for k in path) for path, leaf
           in jax.tree_util.tree_flatten_with_path(params)[0] if leaf.ndim >= 2]
  natural = sorted(paths, key=lambda p: [int(t) if t.isdigit() else t
                                         for t in re.split(r"(\d+)", p)])
  assert natural[0] == "conv1/kernel"
  assert natural[-1] == "linear/kernel"


# --------------------------------------------------------------------------- PyTorch import

def test_flax_path_maps_pytorch_names_to_flax_scopes():
  assert torch_convert.flax_path("layer1.0.conv1.weight", 4) == (
      "params", ("layer1_0", "conv1", "kernel"))
  assert torch_convert.flax_path("bn1.weight", 1) == ("params", ("bn1", "scale"))
  assert torch_convert.flax_path("bn1.running_var", 1) == ("batch_stats", ("bn1", "var"))
  assert torch_convert.flax_path("layer2.0.shortcut.1.running_mean", 1) == (
      "batch_stats", ("layer2_0", "shortcut_1", "mean"))
  assert torch_convert.flax_path("bn1.num_batches_tracked", 0) is None


def test_convert_transposes_conv_and_linear_kernels():
  conv = np.arange(2 * 3 * 5 * 7, dtype=np.float32).reshape(2, 3, 5, 7)  # OIHW
  dense = np.arange(6, dtype=np.float32).reshape(2, 3)  # [out, in]
  params, _ = torch_convert.convert_state_dict({"c.weight": conv, "d.weight": dense})
  np.testing.assert_array_equal(params["c"]["kernel"], conv.transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["d"]["kernel"], dense.T)


def test_convert_rejects_a_state_dict_that_does_not_fit_the_model():
  target = jax.eval_shape(lambda: _init(models.cifar_resnet(20), (1, 32, 32, 3)))
  state = {"conv1.weight": np.zeros((16, 3, 3, 3), np.float32),
           "linear.weight": np.zeros((100, 64), np.float32)}
  with pytest.raises(models.CheckpointMismatchError,
                     match=r"(?s)95 missing.*batch_stats/bn1/mean.*shape:\s+params/linear/kernel"):
    torch_convert.convert_state_dict(state, target)


def test_to_state_dict_is_the_inverse_of_convert_state_dict():
  variables = jax.eval_shape(lambda: _init(models.cifar_resnet(8, shortcut="B"), (1, 32, 32, 3)))
  variables = jax.tree.map(lambda x: np.random.default_rng(0).normal(size=x.shape).astype(np.float32),
                           variables)
  state = models.to_state_dict(variables["params"], variables["batch_stats"])
  assert state["layer2.0.shortcut.0.weight"].shape == (32, 16, 1, 1)
  assert state["linear.weight"].shape == (10, 64)
  params, batch_stats = torch_convert.convert_state_dict(state, variables)
  chex.assert_trees_all_equal(params, variables["params"])
  chex.assert_trees_all_equal(batch_stats, variables["batch_stats"])


def test_load_state_dict_strips_dataparallel_prefix(tmp_path):
  path = tmp_path / "sd.npz"
  np.savez(path, **{"module.fc.weight": np.ones((2, 3), np.float32)})
  assert list(torch_convert.load_state_dict(path)) == ["fc.weight"]


def _torch_reference_resnet20(state, images_nchw):
  """Independent NCHW forward of the PyTorch ResNet-20 (eval mode) straight from the state dict."""
  def conv(x, w, stride):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), ((1, 1), (1, 1)),
                                        dimension_numbers=("NCHW", "OIHW", "NCHW"),
                                        precision="highest")

  def bn(x, name):
    shape = (1, -1, 1, 1)
    mean, var = state[f"{name}.running_mean"].reshape(shape), state[f"{name}.running_var"].reshape(shape)
    return ((x - mean) / np.sqrt(var + 1e-5) * state[f"{name}.weight"].reshape(shape)
            + state[f"{name}.bias"].reshape(shape))

  x = jax.nn.relu(bn(conv(images_nchw, state["conv1.weight"], 1), "bn1"))
  for stage in (1, 2, 3):
    for block in range(3):
      name = f"layer{stage}.{block}"
      stride = 2 if stage > 1 and block == 0 else 1
      y = jax.nn.relu(bn(conv(x, state[f"{name}.conv1.weight"], stride), f"{name}.bn1"))
      y = bn(conv(y, state[f"{name}.conv2.weight"], 1), f"{name}.bn2")
      if stride == 2:
        planes = y.shape[1]
        x = jnp.pad(x[:, :, ::2, ::2], ((0, 0), (planes // 4, planes // 4), (0, 0), (0, 0)))
      x = jax.nn.relu(y + x)
  x = x.mean(axis=(2, 3))
  return x @ state["linear.weight"].T + state["linear.bias"]


@needs_reference
def test_official_resnet20_converts_every_key_with_the_right_shapes():
  state = torch_convert.load_state_dict(REFERENCE_FP)
  target = jax.eval_shape(lambda: _init(models.cifar_resnet(20), (1, 32, 32, 3)))
  params, batch_stats = torch_convert.convert_state_dict(state, target)  # raises on any mismatch
  converted = len(jax.tree.leaves(params)) + len(jax.tree.leaves(batch_stats))
  assert converted == len([k for k in state if not k.endswith("num_batches_tracked")])


@needs_reference
def test_official_resnet20_round_trips_to_the_same_state_dict():
  state = torch_convert.load_state_dict(REFERENCE_FP)
  params, batch_stats = torch_convert.convert_state_dict(state)
  back = models.to_state_dict(params, batch_stats)
  expected = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
  assert back.keys() == expected.keys()
  for key, value in expected.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)


@pytest.mark.slow  # ResNet-20 with the official weights, two forward passes
@needs_reference
def test_converted_resnet20_matches_an_independent_pytorch_layout_forward():
  state = torch_convert.load_state_dict(REFERENCE_FP)
  model = models.cifar_resnet(20)
  params, batch_stats = torch_convert.convert_state_dict(state)
  images = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  with jax.default_matmul_precision("highest"):
    ours = model.apply({"params": params, "batch_stats": batch_stats}, images)
    reference = _torch_reference_resnet20(state, jnp.transpose(images, (0, 3, 1, 2)))
  np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4)


@needs_reference
def test_converted_resnet20_uses_the_checkpoint_batch_norm_statistics():
  state = torch_convert.load_state_dict(REFERENCE_FP)
  model = models.cifar_resnet(20)
  params, batch_stats = torch_convert.convert_state_dict(state)
  fresh_stats = jax.tree.map(jnp.zeros_like, batch_stats)
  fresh_stats = jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.ones_like(x) if path[-1].key == "var" else x, fresh_stats)
  images = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  with_stats = model.apply({"params": params, "batch_stats": batch_stats}, images)
  without = model.apply({"params": params, "batch_stats": fresh_stats}, images)
  assert np.abs(with_stats - without).max() > 1.0
