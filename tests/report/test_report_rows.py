"""Every quantized leaf has a row of its own, under its full path."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ec2t_jax import report


def _ternary(shape, seed):
  rng = np.random.default_rng(seed)
  return (0.5 * rng.integers(-1, 2, size=shape)).astype(np.float32)


def test_long_paths_differing_in_the_middle_print_as_distinct_rows():
  tree = {"encoder": {"layer": {str(i): {"attention": {"self_attention": {"key": {
      "kernel": _ternary((8, 8), i)}}}} for i in range(3)}}}
  text = report.format_report(report.build_report(tree, geometry="none"))
  rows = [line for line in text.splitlines() if "/key/kernel" in line]
  assert [row.split()[0] for row in rows] == [
      f"encoder/layer/{i}/attention/self_attention/key/kernel" for i in range(3)]


class _WithToken(nn.Module):

  @nn.compact
  def __call__(self, x):
    token = self.param("cls", nn.initializers.ones, (1, 1, 4))
    x = nn.Dense(4, name="fc")(x) + token
    return nn.Dense(2, name="head")(x)


def test_ternary_leaf_outside_the_geometry_has_a_row():
  model, x = _WithToken(), jnp.zeros((2, 3, 3))
  params = jax.tree.map(np.asarray, jax.jit(model.init)(jax.random.key(0), x)["params"])
  layers = report.trace_geometry(lambda p, x: model.apply({"params": p}, x), params, x)
  assert "cls" not in [g.path for g in layers]
  params["cls"] = _ternary((1, 1, 4), 0)
  built = report.build_report(params, geometry=layers)
  row = next(layer for layer in built["layers"] if layer["path"] == "cls")
  assert row["ternary"] and row["shape"] == [1, 1, 4]
  assert "cls" in report.format_report(built)
