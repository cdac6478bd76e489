"""A kernel is what the trace shows being multiplied; misuse is caught.

The trace (``ec2t.forward_order``) selects only leaves that enter a
``dot_general`` or a convolution as the weight operand and reads each one's
output axis off the dimension numbers; without a trace the default warns
where shape and name may mislead; an optax chain that moves the params off
the quantizer's grid is counted and reported.
"""

import warnings

import flax.linen as nn
from hypothesis import given, settings, strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ec2t_jax as ec2t
from ec2t_jax._src.core import selection as selection_lib


def _shapes(model, *args):
  """The params' shapes and dtypes (selection and tracing need nothing more)."""
  return jax.eval_shape(lambda: model.init(jax.random.key(0), *args))["params"]


def _selected(params, selection):
  return sorted(p.path for p in selection.plan(params) if p)


def _plans(params, selection):
  return {p.path: p for p in selection.plan(params) if p}


# ------------------------------------------------------------- ViT-style model


class _TinyViT(nn.Module):
  """Patch embedding, a class token (1, 1, d), a position embedding (1, N, d),
  two dense blocks and a head."""
  d: int = 8

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.d, (2, 2), strides=(2, 2), name="patch")(x)
    x = x.reshape(x.shape[0], -1, self.d)
    cls = self.param("cls", nn.initializers.normal(0.02), (1, 1, self.d))
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.d)), x], axis=1)
    x = x + self.param("pos_embedding", nn.initializers.normal(0.02),
                       (1, x.shape[1], self.d))
    x = nn.LayerNorm(name="ln")(x)
    x = nn.relu(nn.Dense(16, name="mlp_in")(x))
    x = nn.Dense(self.d, name="mlp_out")(x)
    return nn.Dense(3, name="head")(x[:, 0])


_VIT_X = jnp.ones((2, 4, 4, 1))


@pytest.fixture(scope="module")
def vit():
  model = _TinyViT()
  params = _shapes(model, _VIT_X)
  order = ec2t.forward_order(lambda p, x: model.apply({"params": p}, x), params, _VIT_X)
  return params, order


def test_trace_does_not_select_class_token_or_position_embedding(vit):
  params, order = vit
  assert _selected(params, ec2t.Selection(order=order)) == ["mlp_in/kernel", "mlp_out/kernel"]


def test_trace_lists_only_multiplied_leaves_as_weights(vit):
  _, order = vit
  assert order.multiplied == {"patch/kernel", "mlp_in/kernel", "mlp_out/kernel",
                              "head/kernel"}


def test_untraced_default_warns_naming_class_token_and_position_embedding():
  params = _TinyViT().init(jax.random.key(0), _VIT_X)["params"]  # keys in call order
  with pytest.warns(UserWarning, match=r"'cls' \(1, 1, 8\).*'pos_embedding' \(1, 5, 8\)"
                    r".*never multiplied.*forward_order"):
    ec2t.Selection().plan(params)


# ---------------------------------------------------------- (out, in) kernels


class _OutIn(nn.Module):
  """Kernels stored (out, in) and applied as ``x @ k.T`` (GPT-2's Conv1D style)."""

  @nn.compact
  def __call__(self, x):
    for i, (n_in, n_out) in enumerate(((4, 6), (6, 5), (5, 7), (7, 3))):
      k = self.param(f"fc{i}_weight", nn.initializers.normal(1.0), (n_out, n_in))
      x = jnp.tanh(x @ k.T)
    return x


_OUTIN_X = jnp.ones((2, 4))


@pytest.fixture(scope="module")
def out_in():
  model = _OutIn()
  params = jax.jit(model.init)(jax.random.key(1), _OUTIN_X)["params"]
  fn = lambda p, x: model.apply({"params": p}, x)
  return params, ec2t.forward_order(fn, params, _OUTIN_X), fn


def test_trace_reads_output_axis_zero_for_out_in_kernels(out_in):
  params, order = out_in[:2]
  plans = _plans(params, ec2t.Selection(order=order))
  assert {p: plan.output_axis for p, plan in plans.items()} == {
      "fc1_weight": 0, "fc2_weight": 0}


def _per_row_twn(w, factor=0.75):
  """numpy oracle: TWN per output filter with filters on the rows."""
  w = np.asarray(w, np.float64)
  delta = factor * np.abs(w).mean(axis=1, keepdims=True)
  a = np.where(np.abs(w) > delta, np.sign(w), 0)
  alpha = np.array([np.abs(r[m != 0]).mean() if (m != 0).any() else 0
                    for r, m in zip(w, a)])[:, None]
  return a, alpha


def test_twn_filter_scales_per_output_row_of_out_in_kernel(out_in):
  params, order, _ = out_in
  tx = ec2t.twn(threshold="filter", selection=ec2t.Selection(order=order))
  state = tx.init(params)
  leaf = ec2t.find_quantizer_state(state).resolved_leaves()["fc1_weight"]
  a, alpha = _per_row_twn(params["fc1_weight"])
  assert leaf.scale.shape == (5, 1)
  np.testing.assert_array_equal(np.asarray(leaf.assignment), a)
  np.testing.assert_allclose(np.asarray(leaf.scale), alpha, rtol=1e-6)


def test_twn_filter_keeps_output_axis_after_an_update(out_in):
  params, order, _ = out_in
  tx = optax.chain(optax.sgd(0.1), ec2t.twn(threshold="filter",
                                            selection=ec2t.Selection(order=order)))
  state = tx.init(params)
  updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  params = optax.apply_updates(params, updates)
  leaf = ec2t.find_quantizer_state(state).resolved_leaves()["fc1_weight"]
  assert leaf.scale.shape == (5, 1)
  # each output row holds one magnitude
  for row in np.asarray(params["fc1_weight"]):
    assert np.unique(np.abs(row[row != 0])).size <= 1


def test_sttn_scales_per_output_row_of_out_in_kernel(out_in):
  params, order, _ = out_in
  state = ec2t.sttn(selection=ec2t.Selection(order=order)).init(params)
  leaf = ec2t.find_quantizer_state(state).resolved_leaves()["fc2_weight"]
  w1, w2 = np.asarray(leaf.latent), np.asarray(leaf.latent2)
  expected = 0.5 * (np.abs(w1).mean(axis=1, keepdims=True) + np.abs(w2).mean(axis=1, keepdims=True))
  assert leaf.scale.shape == (7, 1)
  np.testing.assert_allclose(np.asarray(leaf.scale), expected, rtol=1e-6)


def test_rule_output_axis_overrides_the_default_last_axis(out_in):
  params = out_in[0]
  rule = ec2t.Rule(r"fc[12]_weight", output_axis=0)
  state = ec2t.twn(threshold="filter", selection=[rule]).init(params)
  assert ec2t.find_quantizer_state(state).resolved_leaves()["fc1_weight"].scale.shape == (5, 1)


@pytest.mark.parametrize("axis", [2, -3])
def test_rule_output_axis_out_of_range_is_an_error_naming_the_leaf(out_in, axis):
  with pytest.raises(ValueError, match=rf"output_axis={axis}.*'fc1_weight' of shape \(5, 6\)"):
    ec2t.Selection([ec2t.Rule("fc1_weight", output_axis=axis)]).plan(out_in[0])


@pytest.mark.parametrize("axis", [True, 1.0, "0"])
def test_rule_output_axis_must_be_an_int(axis):
  with pytest.raises(ValueError, match="Rule.output_axis must be an int"):
    ec2t.Rule("k", output_axis=axis)


# ------------------------------------------------------ stacked, without trace


class _Block(nn.Module):

  @nn.compact
  def __call__(self, x, _):
    h = nn.LayerNorm(name="ln")(x)
    return x + nn.Dense(8, name="mlp")(nn.relu(nn.Dense(16, name="fc")(h))), None


class _Scanned(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(8, name="stem")(x)
    blocks = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=3)
    x, _ = blocks(name="blocks")(x, None)
    return nn.Dense(2, name="head")(x)


def test_untraced_scan_tree_warns_naming_the_stacked_kernels():
  params = _Scanned().init(jax.random.key(0), jnp.ones((2, 4)))["params"]  # call order
  assert params["blocks"]["ln"]["scale"].shape == (3, 8)
  with pytest.warns(UserWarning, match=r"stacks of layers.*'blocks/ln/scale' \(3, 8\).*"
                    r"'blocks/fc/kernel' \(3, 8, 16\).*ONE layer.*stack_axes"):
    selected = _selected(params, ec2t.Selection())
  assert "blocks/ln/scale" not in selected


def test_traced_scan_tree_neither_warns_nor_selects_norm_scales():
  model = _Scanned()
  x = jnp.ones((2, 4))
  params = _shapes(model, x)
  order = ec2t.forward_order(lambda p, x: model.apply({"params": p}, x), params, x)
  with warnings.catch_warnings():
    warnings.simplefilter("error", UserWarning)
    plans = _plans(params, ec2t.Selection(order=order))
  assert sorted(plans) == ["blocks/fc/kernel", "blocks/mlp/kernel"]
  assert all(p.stack_ndim == 1 for p in plans.values())


# ------------------------------------------------------------ misuse: the grid


class _Mlp(nn.Module):

  @nn.compact
  def __call__(self, x):
    for width in (8, 8, 8, 3):
      x = nn.tanh(nn.Dense(width)(x))
    return x


def _train(chain_of, steps=3):
  model, x = _Mlp(), jnp.ones((2, 5))
  params = jax.jit(model.init)(jax.random.key(0), x)["params"]
  loss = lambda p: jnp.sum(model.apply({"params": p}, x) ** 2)
  tx = chain_of(ec2t.ternarize_transform(gamma=0.05))
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state)
  return params, state


def test_quantizer_placed_first_is_counted_reported_and_warned():
  params, state = _train(lambda q: optax.chain(q, optax.adam(1e-2)))
  assert np.unique(np.asarray(params["Dense_1"]["kernel"])).size > 3  # off the grid
  assert int(ec2t.find_quantizer_state(state).off_grid_count) == 2  # updates 2 and 3
  with pytest.warns(UserWarning, match=r"off the grid: 2 of 3 updates.*quantizer last"):
    text = str(ec2t.summary(state))
  assert "WARNING: params off the grid" in text


def test_quantizer_placed_last_counts_no_off_grid_update():
  params, state = _train(lambda q: optax.chain(optax.adam(1e-2), q))
  assert np.unique(np.asarray(params["Dense_1"]["kernel"])).size <= 3
  with warnings.catch_warnings():
    warnings.simplefilter("error", UserWarning)
    summary = ec2t.summary(state)
  assert summary.off_grid_count == 0 and "off the grid" not in str(summary)


# ------------------------------------------------------ misuse: forward_order


def test_forward_order_with_swapped_arguments_is_an_error():
  model, x = _Mlp(), jnp.ones((2, 5))
  params = _shapes(model, x)
  fn = lambda p, x: model.apply({"params": p}, x)
  with pytest.raises(TypeError, match=r"params is a bare ArrayImpl of shape \(2, 5\).*swapped"):
    ec2t.forward_order(fn, x, params)


def test_forward_order_of_a_tree_no_multiply_reads_is_an_error():
  params = {"shift": jnp.ones((3,)), "gain": jnp.ones((3,))}
  with pytest.raises(ValueError, match=r"none of the 2 parameter leaves.*enters a matrix "
                     r"multiply or a convolution"):
    ec2t.forward_order(lambda p, x: x * p["gain"] + p["shift"], params, jnp.ones((2, 3)))


# ------------------------------------------------- misuse: copies of an order


class _Tied(nn.Module):
  """Token embedding tied to the head (``embed.attend``), two blocks of four kernels."""

  @nn.compact
  def __call__(self, ids):
    embed = nn.Embed(11, 8, name="embed")
    x = embed(ids)
    for b in range(2):
      for name in ("q", "k", "v", "o"):
        x = x + nn.Dense(8, name=f"block{b}_{name}")(x)
    return embed.attend(x)


@pytest.fixture(scope="module")
def tied():
  ids = jnp.zeros((2, 3), jnp.int32)
  params = _shapes(_Tied(), ids)
  order = ec2t.forward_order(lambda p, i: _Tied().apply({"params": p}, i), params, ids)
  return params, order


def test_list_copy_of_forward_order_keeps_what_the_trace_showed(tied):
  params, order = tied
  assert len(_selected(params, ec2t.Selection(order=order))) == 8
  assert _selected(params, ec2t.Selection(order=list(order))) == _selected(
      params, ec2t.Selection(order=order))


def test_edited_copy_of_forward_order_is_refused(tied):
  _, order = tied
  with pytest.raises(ValueError, match=r"edited copy of ec2t.forward_order.*\[str\(p\)"):
    ec2t.Selection(order=list(reversed(order)))


def test_plain_strings_give_the_trace_up_deliberately(tied):
  _, order = tied
  assert ec2t.Selection(order=[str(p) for p in order]).traced is None


# ------------------------------------------------ property: random layouts


def _random_model(layouts, widths):
  """Params and fn: kernel i maps width i to width i+1 in layout i; each
  also has a token (1, 1, d) added to the activations (never multiplied)."""
  params, expected = {}, {}
  for i, layout in enumerate(layouts):
    n_in, n_out = widths[i], widths[i + 1]
    shape, axis = {"in_out": ((n_in, n_out), -1), "out_in": ((n_out, n_in), 0),
                   "dot_out_in": ((n_out, n_in), 0), "heads": ((n_in, 2, n_out), -1),
                   "heads_first": ((2, n_out, n_in), 1), "conv_hwio": ((1, 1, n_in, n_out), -1),
                   "conv_oihw": ((n_out, n_in, 1, 1), 0)}[layout]
    params[f"l{i}"] = {"kernel": jnp.ones(shape), "token": jnp.ones((1, 1, n_out))}
    expected[f"l{i}/kernel"] = axis

  def fn(p, x):  # x: (batch, 1, 1, width)
    for i, layout in enumerate(layouts):
      k = p[f"l{i}"]["kernel"]
      if layout == "in_out":
        x = x @ k
      elif layout == "out_in":
        x = x @ k.T
      elif layout == "dot_out_in":
        x = jax.lax.dot_general(x, k, (((3,), (1,)), ((), ())))
      elif layout == "heads":
        x = jnp.einsum("bhwd,dne->bhwne", x, k).sum(3)
      elif layout == "heads_first":
        x = jnp.einsum("bhwd,ned->bhwne", x, k).sum(3)
      elif layout == "conv_hwio":
        x = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
      else:
        x = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "OIHW", "NHWC"))
      x = jnp.tanh(x + p[f"l{i}"]["token"][None])
    return x

  return params, fn, expected


_LAYOUTS = ("in_out", "out_in", "dot_out_in", "heads", "heads_first", "conv_hwio", "conv_oihw")


@settings(max_examples=30, deadline=None)
@given(st.lists(st.sampled_from(_LAYOUTS), min_size=1, max_size=4), st.data())
def test_trace_selects_exactly_the_multiplied_leaves_with_their_output_axes(layouts, data):
  widths = data.draw(st.lists(st.integers(2, 5), min_size=len(layouts) + 1,
                              max_size=len(layouts) + 1))
  params, fn, expected = _random_model(layouts, widths)
  order = ec2t.forward_order(fn, params, jnp.ones((2, 1, 1, widths[0])))
  assert order.output_axes == expected
  plans = _plans(params, ec2t.Selection(default=lambda p, l: True,
                                        rules=[ec2t.Rule("token", mode="skip")], order=order))
  assert {p: plan.output_axis for p, plan in plans.items()} == expected
  kernels = selection_lib.Selection(default="all_but_last", order=order)._layers(  # pylint: disable=protected-access
      *_named(params))[0]
  assert {_named(params)[0][i] for i in kernels} == set(expected)


def _named(params):
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  paths = [selection_lib.path_to_str(p) for p, _ in flat]
  return paths, [leaf for _, leaf in flat], [0] * len(flat)


def test_kernel_named_leaf_the_trace_never_multiplies_is_warned_about():
  params = {"a": {"kernel": jnp.ones((3, 3))}, "b": {"kernel": jnp.ones((3, 3))},
            "c": {"kernel": jnp.ones((3, 3))}, "gate": {"kernel": jnp.ones((2, 2))}}
  fn = lambda p, x: ((x @ p["a"]["kernel"] @ p["b"]["kernel"] @ p["c"]["kernel"])[:, :2]
                     * p["gate"]["kernel"][0])
  order = ec2t.forward_order(fn, params, jnp.ones((2, 3)))
  with pytest.warns(UserWarning, match=r"'gate/kernel', named like kernels, but never.*Rule"):
    assert _selected(params, ec2t.Selection(order=order)) == ["b/kernel"]
