"""The ternary path (two masked accumulations, two products) equals the dense computation."""

from pathlib import Path

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ec2t_jax import export
from ec2t_jax._src.export import inference

DATA = Path(__file__).parents[2].parent / "shared/data/ec2t-reference"
ATOL = 1e-5


def _weight(seed, shape, w_n=0.3, w_p=0.45):
  a = np.random.default_rng(seed).choice(np.array([-1, 0, 1], np.int8), shape,
                                         p=[0.25, 0.5, 0.25])
  return inference.TernaryWeight(jnp.asarray(a), jnp.float32(w_n), jnp.float32(w_p))


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


@pytest.mark.parametrize("layout", ["IO", "OI"])
def test_ternary_dense_equals_dense_matmul(layout):
  w = _weight(0, (12, 7) if layout == "IO" else (7, 12))
  x = _normal(1, (5, 12))
  bias = jnp.arange(7, dtype=jnp.float32)
  kernel = w.values() if layout == "IO" else w.values().T
  expected = jnp.matmul(x, kernel, precision="highest") + bias
  chex.assert_trees_all_close(inference.ternary_dense(x, w, bias, layout=layout), expected,
                              atol=ATOL)


def test_ternary_dense_is_jittable():
  w = _weight(2, (6, 3))
  x = jnp.ones((2, 6))
  chex.assert_trees_all_close(jax.jit(inference.ternary_dense)(x, w),
                              inference.ternary_dense(x, w), atol=ATOL)


@pytest.mark.parametrize("strides, padding", [((1, 1), "SAME"), ((2, 2), ((1, 1), (1, 1))),
                                              ((1, 2), "VALID")])
def test_ternary_conv_equals_dense_conv_nhwc(strides, padding):
  w = _weight(3, (3, 3, 4, 6))
  x = _normal(4, (2, 9, 9, 4))
  bias = jnp.linspace(-1, 1, 6)
  expected = jax.lax.conv_general_dilated(
      x, w.values(), strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision="highest") + bias
  got = inference.ternary_conv(x, w, bias, strides=strides, padding=padding)
  chex.assert_trees_all_close(got, expected, atol=ATOL)


def test_ternary_conv_equals_dense_conv_pytorch_layout():
  w = _weight(5, (6, 4, 3, 3))
  x = _normal(6, (2, 4, 8, 8))
  dn = ("NCHW", "OIHW", "NCHW")
  bias = jnp.arange(6, dtype=jnp.float32)
  expected = jax.lax.conv_general_dilated(x, w.values(), (1, 1), "SAME", dimension_numbers=dn,
                                          precision="highest") + bias[:, None, None]
  got = inference.ternary_conv(x, w, bias, dimension_numbers=dn)
  chex.assert_trees_all_close(got, expected, atol=ATOL)


class _Net(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3), strides=(2, 2))(x))
    x = nn.relu(nn.Conv(8, (3, 3), use_bias=False)(x))
    return nn.Dense(3)(x.mean((1, 2)))


def _init(model, x, seed):
  """Parameters of ``model`` filled from numpy (skips compiling JAX's RNG)."""
  rng = np.random.default_rng(seed)
  template = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape).astype(s.dtype)),
                      template)


def _ternarize(params, skip=("Conv_0",)):
  def snap(path, w):
    name = jax.tree_util.keystr(path)
    if w.ndim < 2 or any(s in name for s in skip):
      return w
    scale = jnp.abs(w).mean()
    return jnp.where(w > 0.7 * scale, 0.5, jnp.where(w < -0.7 * scale, -0.25, 0.0))
  return jax.tree_util.tree_map_with_path(snap, params)


def test_ternary_apply_equals_model_apply_and_uses_the_ternary_layers():
  model = _Net()
  x = _normal(7, (2, 8, 8, 3))
  variables = {"params": _ternarize(_init(model, x, 8))}
  chex.assert_equal(sorted(inference.ternary_weights(variables["params"])),
                    ["Conv_1/kernel", "Dense_0/kernel"])
  chex.assert_trees_all_close(inference.ternary_apply(model, variables, x),
                              model.apply(variables, x), atol=ATOL)


def test_params_loaded_from_the_packed_file_apply_like_the_originals(tmp_path):
  model = _Net()
  x = _normal(9, (2, 8, 8, 3))
  params = _ternarize(_init(model, x, 10))
  export.save(tmp_path / "m.ec2t", params)
  loaded = export.load(tmp_path / "m.ec2t")
  chex.assert_trees_all_equal(model.apply({"params": loaded}, x),
                              model.apply({"params": params}, x))
  ternary = export.load_ternary(tmp_path / "m.ec2t")
  got = inference.ternary_conv(jnp.ones((1, 4, 4, 8)), ternary["Conv_1"]["kernel"])
  expected = jax.lax.conv_general_dilated(
      jnp.ones((1, 4, 4, 8)), params["Conv_1"]["kernel"], (1, 1), "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest")
  chex.assert_trees_all_close(got, expected, atol=ATOL)


def test_official_resnet20_runs_from_the_packed_file_on_the_ternary_path(tmp_path):
  path = DATA / "resnet20_ec2t_spars64.npz"
  if not path.exists():
    pytest.skip(f"{path} not available")
  resnet = pytest.importorskip("ec2t_jax.models.resnet")
  export.export_file(path, tmp_path / "r20.ec2t")
  state = export.load(tmp_path / "r20.ec2t")
  model = resnet.cifar_resnet(20)
  x = _normal(11, (2, 32, 32, 3))
  template = jax.eval_shape(model.init, jax.random.key(0), x)
  variables = jax.tree_util.tree_map_with_path(
      lambda p, leaf: _torch_value(state, p, leaf.shape), template)
  weights = inference.ternary_weights(variables["params"])
  chex.assert_equal(len(weights), 18)
  run = jax.jit(lambda v, tw, x: inference.ternary_apply(model, v, x, ternary=tw))
  got = run(variables, weights, x)
  chex.assert_trees_all_close(got, model.apply(variables, x), atol=1e-4)


def _torch_value(state, path, shape):
  """Official state-dict value for a Flax leaf of :mod:`ec2t_jax.models.resnet`."""
  keys = [k.key for k in path]
  module = ".".join(k.replace("_", ".") for k in keys[1:-1])
  leaf = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
          "var": "running_var"}[keys[-1]]
  value = state[f"{module}.{leaf}"]
  if value.ndim == 4:
    value = value.transpose(2, 3, 1, 0)
  elif value.ndim == 2:
    value = value.T
  assert value.shape == shape, (path, value.shape, shape)
  return jnp.asarray(value)
