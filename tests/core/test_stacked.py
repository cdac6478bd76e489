"""Stacked layers (nn.scan / nnx.vmap + nnx.scan) and the transformer rule.

The oracle: a scanned model and the unrolled model with the same weights
follow the same trajectory (assignments equal, values within float rounding)
for every method, in Linen and in NNX.
"""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ec2t_jax as ec2t
from ec2t_jax._src import core as ec2t_core
from models_for_tests import gpt_loss, TinyGPT, token_batch, unstack_blocks

LAYERS = 3
BLOCK_KERNELS = ("attn/kernel", "attn_proj/kernel", "c_fc/kernel", "c_proj/kernel")


def _linen(scan=True, tied=True):
  model = TinyGPT(layers=LAYERS, scan=scan, tied=tied)
  tokens, _ = token_batch()
  params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]
  order = ec2t.forward_order(lambda p, x: model.apply({"params": p}, x), params, tokens)
  return model, params, order


def _selected(params, selection):
  return {p.path: p.stack_ndim for p in ec2t.Selection(**selection).plan(params) if p}


# ------------------------------------------------------------ finding stacks


def test_forward_order_finds_the_leaves_a_scan_slices():
  _, params, order = _linen()
  assert order.stack_ndim == {
      f"blocks/{name}": 1 for name in
      ("ln_1/scale", "ln_1/bias", "attn/kernel", "attn/bias", "attn_proj/kernel",
       "attn_proj/bias", "ln_2/scale", "ln_2/bias", "c_fc/kernel", "c_fc/bias",
       "c_proj/kernel", "c_proj/bias")}
  assert params["blocks"]["c_fc"]["kernel"].shape == (LAYERS, 8, 32)


def test_forward_order_sees_the_embedding_lookup_and_the_tied_head_last():
  _, _, order = _linen()
  assert order.lookups == {"wte/embedding"}
  assert order[0] == "wte/embedding"
  assert max(order.last_use, key=order.last_use.get) == "wte/embedding"


def test_forward_order_is_still_a_list_of_paths():
  _, _, order = _linen()
  assert isinstance(order, list) and all(isinstance(p, str) for p in order)


# ------------------------------------------------ the rule for transformers


def test_tied_gpt_ternarizes_every_block_kernel_and_no_norm_or_bias():
  _, params, order = _linen(scan=True)
  assert _selected(params, {"order": order}) == {
      f"blocks/{k}": 1 for k in BLOCK_KERNELS}


def test_tied_unrolled_gpt_ternarizes_every_block_kernel():
  _, params, order = _linen(scan=False)
  assert set(_selected(params, {"order": order})) == {
      f"blocks_{i}/{k}" for i in range(LAYERS) for k in BLOCK_KERNELS}


def test_untied_head_stays_full_precision():
  _, params, order = _linen(scan=True, tied=False)
  assert "head/kernel" not in _selected(params, {"order": order})
  assert len(_selected(params, {"order": order})) == len(BLOCK_KERNELS)


def test_untraced_tied_gpt_guesses_first_and_last_by_natural_sort_and_says_so():
  # Without the trace the order is a guess (the documented limitation): the natural sort of
  # the paths puts the tied embedding last here, so every block kernel but the first is
  # ternarized; the selection warns that it guessed.
  _, params, _ = _linen(scan=False)
  with pytest.warns(UserWarning, match="guessed by natural sort"):
    selected = _selected(params, {})
  assert "blocks_0/attn/kernel" not in selected and "wte/embedding" not in selected
  assert "blocks_2/c_proj/kernel" in selected


def test_dense_general_3d_kernel_is_one_layer():
  _, params, order = _linen(scan=False)
  plans = {p.path: p for p in ec2t.Selection(order=order).plan(params) if p}
  assert params["blocks_0"]["attn"]["kernel"].ndim == 3
  assert plans["blocks_0/attn/kernel"].stack_ndim == 0


def test_dense_general_2d_bias_is_not_a_kernel():
  _, params, order = _linen(scan=False)
  assert params["blocks_0"]["attn"]["bias"].shape == (2, 4)
  assert "blocks_0/attn/bias" not in _selected(params, {"order": order})


def test_is_kernel_judges_one_slice():
  from ec2t_jax._src.core.selection import is_kernel  # pylint: disable=g-import-not-at-top
  assert is_kernel("blocks/c_fc/kernel", jnp.ones((3, 8, 32)), 1)
  assert not is_kernel("blocks/c_fc/kernel", jnp.ones((3, 8)), 1)
  assert is_kernel("blocks/c_fc/kernel", jnp.ones((3, 8)))
  assert not is_kernel("blocks/ln/scale", jnp.ones((3, 8)))  # a norm's scale, stacked


# ------------------------------------------------------------------- oracle

METHODS = {
    "ec2t": lambda sel: ec2t.ternarize_transform(gamma=0.2, selection=sel),
    "twn": lambda sel: ec2t.twn(selection=sel),
    "ttq": lambda sel: ec2t.ttq(selection=sel),
    "mlq": lambda sel: ec2t.mlq(steps_per_stage=1, selection=sel),
}


def _train_linen(model, params, tx, steps):
  opt_state = tx.init(params)
  params = ec2t.quantized_params(params, opt_state)

  @jax.jit
  def step(params, opt_state, tokens, targets):
    grads = jax.grad(lambda p: gpt_loss(model, p, tokens, targets))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for i in range(steps):
    params, opt_state = step(params, opt_state, *token_batch(i))
  return params, opt_state


def _assert_same_trajectory_point(scanned, unrolled):
  """Same zero/sign pattern, values within float rounding, every leaf."""
  unstacked = unstack_blocks(scanned, LAYERS)
  flat_s = dict(jax.tree_util.tree_flatten_with_path(unstacked)[0])
  flat_u = dict(jax.tree_util.tree_flatten_with_path(unrolled)[0])
  assert flat_s.keys() == flat_u.keys()
  for key in flat_u:
    s, u = np.asarray(flat_s[key]), np.asarray(flat_u[key])
    np.testing.assert_allclose(s, u, rtol=2e-5, atol=2e-6, err_msg=str(key))


def _assert_same_assignments(scanned_state, unrolled_state, field="assignment"):
  s = scanned_state.field(field)["blocks"]
  u = unrolled_state.field(field)
  for i in range(LAYERS):
    for name in BLOCK_KERNELS:
      layer, leaf = name.split("/")
      np.testing.assert_array_equal(s[layer][leaf][i], u[f"blocks_{i}"][layer][leaf])


@pytest.mark.parametrize("method", [
    "ec2t", *(pytest.param(m, marks=pytest.mark.slow) for m in ("mlq", "ttq", "twn"))])
def test_linen_scanned_and_unrolled_follow_the_same_trajectory(method):
  scan_model, scan_params, scan_order = _linen(scan=True)
  unroll_model = TinyGPT(layers=LAYERS, scan=False)
  unroll_params = unstack_blocks(scan_params, LAYERS)
  unroll_order = ec2t.forward_order(
      lambda p, x: unroll_model.apply({"params": p}, x), unroll_params, token_batch()[0])
  tx = lambda order: optax.chain(optax.adam(3e-2),
                                 METHODS[method](ec2t.Selection(order=order)))
  p_s, st_s = _train_linen(scan_model, scan_params, tx(scan_order), steps=4)
  p_u, st_u = _train_linen(unroll_model, unroll_params, tx(unroll_order), steps=4)
  _assert_same_trajectory_point(p_s, p_u)
  q_s, q_u = ec2t.find_quantizer_state(st_s), ec2t.find_quantizer_state(st_u)
  s_vals = unstack_blocks(ec2t.quantized_params(p_s, st_s), LAYERS)
  u_vals = ec2t.quantized_params(p_u, st_u)
  for i in range(LAYERS):
    for name in BLOCK_KERNELS:
      layer, leaf = name.split("/")
      a = np.asarray(s_vals[f"blocks_{i}"][layer][leaf])
      b = np.asarray(u_vals[f"blocks_{i}"][layer][leaf])
      np.testing.assert_array_equal(np.sign(a), np.sign(b))
  if method == "ec2t":
    _assert_same_assignments(q_s, q_u)


@pytest.mark.slow
def test_reference_mode_scanned_and_unrolled_follow_the_same_trajectory():
  scan_model, scan_params, scan_order = _linen(scan=True)
  unroll_model = TinyGPT(layers=LAYERS, scan=False)
  unroll_params = unstack_blocks(scan_params, LAYERS)
  unroll_order = ec2t.forward_order(
      lambda p, x: unroll_model.apply({"params": p}, x), unroll_params, token_batch()[0])
  tx = lambda order: ec2t.reference_optimizer(
      gamma=0.2, learning_rate=1e-2, latent_learning_rate=1e-2,
      centroid_learning_rate=1e-3, selection=ec2t.Selection(order=order))
  p_s, st_s = _train_linen(scan_model, scan_params, tx(scan_order), steps=3)
  p_u, st_u = _train_linen(unroll_model, unroll_params, tx(unroll_order), steps=3)
  _assert_same_trajectory_point(p_s, p_u)
  _assert_same_assignments(ec2t.find_quantizer_state(st_s), ec2t.find_quantizer_state(st_u))


# ----------------------------------------------------------------------- NNX

_W, _V = 8, 11


class _NnxBlock(nnx.Module):

  def __init__(self, rngs):
    self.ln = nnx.LayerNorm(_W, rngs=rngs)
    self.fc = nnx.Linear(_W, 4 * _W, rngs=rngs)
    self.proj = nnx.Linear(4 * _W, _W, rngs=rngs)

  def __call__(self, x):
    return x + self.proj(nnx.gelu(self.fc(self.ln(x))))


class _NnxGPT(nnx.Module):
  """Blocks stacked with ``nnx.vmap`` and applied with ``nnx.scan`` (``scan``)
  or held in an ``nnx.List``."""

  def __init__(self, scan, rngs):
    self.scan = scan
    self.wte = nnx.Embed(_V, _W, rngs=rngs)
    if scan:
      @nnx.split_rngs(splits=LAYERS)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def make(rngs):
        return _NnxBlock(rngs)
      self.blocks = make(rngs)
    else:
      self.blocks = nnx.List([_NnxBlock(rngs) for _ in range(LAYERS)])
    self.ln_f = nnx.LayerNorm(_W, rngs=rngs)

  def __call__(self, tokens):
    x = self.wte(tokens)
    if self.scan:
      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
      def body(x, block):
        return block(x)
      x = body(x, self.blocks)
    else:
      for block in self.blocks:
        x = block(x)
    return self.wte.attend(self.ln_f(x))


def _nnx_pair():
  scanned = _NnxGPT(True, nnx.Rngs(0))
  unrolled = _NnxGPT(False, nnx.Rngs(1))
  stacked = nnx.to_pure_dict(nnx.state(scanned, nnx.Param))
  per_layer = {"wte": stacked["wte"], "ln_f": stacked["ln_f"],
               "blocks": {i: jax.tree.map(lambda x, i=i: x[i], stacked["blocks"])
                          for i in range(LAYERS)}}
  state = nnx.state(unrolled, nnx.Param)
  nnx.replace_by_pure_dict(state, per_layer)
  nnx.update(unrolled, state)
  return scanned, unrolled


def _train_nnx(model, make_tx, steps):
  graphdef, params = nnx.split(model, nnx.Param)
  tokens = token_batch()[0]
  order = ec2t.forward_order(lambda s, x: nnx.merge(graphdef, s)(x), params, tokens)
  tx = optax.chain(optax.adam(3e-2), make_tx(ec2t.Selection(order=order)))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  nnx.update(model, ec2t.quantized_params(nnx.state(model, nnx.Param), optimizer))

  @nnx.jit
  def step(model, optimizer, tokens, targets):
    def loss_fn(model):
      return optax.softmax_cross_entropy_with_integer_labels(model(tokens), targets).mean()
    grads = nnx.grad(loss_fn)(model)
    optimizer.update(model, grads)

  for i in range(steps):
    step(model, optimizer, *token_batch(i))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param)), optimizer


@pytest.mark.parametrize("method", [
    "ec2t", *(pytest.param(m, marks=pytest.mark.slow) for m in ("twn", "ttq"))])
def test_nnx_scanned_and_unrolled_follow_the_same_trajectory(method):
  scanned, unrolled = _nnx_pair()
  p_s, opt_s = _train_nnx(scanned, METHODS[method], steps=4)
  p_u, opt_u = _train_nnx(unrolled, METHODS[method], steps=4)
  for i in range(LAYERS):
    for name in ("fc", "proj", "ln"):
      for leaf, value in p_u["blocks"][i][name].items():
        np.testing.assert_allclose(p_s["blocks"][name][leaf][i], value,
                                   rtol=2e-5, atol=2e-6)
    for name in ("fc", "proj"):
      np.testing.assert_array_equal(np.sign(p_s["blocks"][name]["kernel"][i]),
                                    np.sign(p_u["blocks"][i][name]["kernel"]))
  rows = [row.path for row in ec2t.summary(opt_s).layers]
  assert rows == [f"blocks/{n}/kernel[{i}]" for n in ("fc", "proj") for i in range(LAYERS)]
  if method == "ec2t":
    s = ec2t.find_quantizer_state(opt_s).field("assignment")["blocks"]["fc"]["kernel"]
    u = ec2t.find_quantizer_state(opt_u).field("assignment")["blocks"]
    for i in range(LAYERS):
      np.testing.assert_array_equal(s[i], u[i]["fc"]["kernel"])


# ------------------------------------------------------ the state and tools


def _stacked_state(gamma=0.2):
  _, params, order = _linen()
  tx = ec2t.ternarize_transform(gamma=gamma, selection=ec2t.Selection(order=order))
  return params, tx, tx.init(params)


def test_each_slice_has_its_own_centroids_and_lambda():
  params, _, state = _stacked_state()
  w_p = state.field("w_p")["blocks"]["c_fc"]["kernel"]
  assert w_p.shape == (LAYERS,)
  kernel = params["blocks"]["c_fc"]["kernel"]
  for i in range(LAYERS):  # the paper's init: w = init_scale * max|W| per layer
    one = ec2t.ternarize_transform(gamma=0.2, selection=[ec2t.Rule("^k$")])
    alone = one.init({"k": kernel[i]})
    np.testing.assert_allclose(w_p[i], alone.field("w_p")["k"], rtol=1e-6)
  assert len(set(np.asarray(w_p).tolist())) == LAYERS


def test_summary_has_one_row_per_slice():
  _, _, state = _stacked_state()
  rows = [row.path for row in ec2t.summary(state).layers]
  assert rows == [f"blocks/{k}[{i}]" for k in sorted(BLOCK_KERNELS) for i in range(LAYERS)]
  assert ec2t.summary(state).layers[0].shape == (8, 2, 4)


def test_ternary_params_keeps_the_stacked_tree():
  params, _, state = _stacked_state()
  values = ec2t.quantized_params(params, state)
  assert jax.tree.structure(values) == jax.tree.structure(params)
  kernel = np.asarray(values["blocks"]["c_fc"]["kernel"])
  assert kernel.shape == (LAYERS, 8, 32)
  for i in range(LAYERS):
    assert len(np.unique(kernel[i])) == 3


def test_frozen_phase_keeps_each_slice_assignment():
  params, tx, state = _stacked_state()
  state = ec2t.set_phase(state, 1)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
  _, new = jax.jit(tx.update)(grads, state, params)
  np.testing.assert_array_equal(new.field("assignment")["blocks"]["c_fc"]["kernel"],
                                state.field("assignment")["blocks"]["c_fc"]["kernel"])


def test_nonfinite_update_in_one_slice_keeps_only_that_slice():
  params, tx, state = _stacked_state()
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
  bad = grads["blocks"]["c_fc"]["kernel"].at[1, 0, 0].set(jnp.nan)
  grads["blocks"]["c_fc"]["kernel"] = bad
  _, new = tx.update(grads, state, params)
  old_w = state.field("w_p")["blocks"]["c_fc"]["kernel"]
  new_w = new.field("w_p")["blocks"]["c_fc"]["kernel"]
  assert new_w[1] == old_w[1] and new_w[0] != old_w[0]
  assert int(new.nonfinite_count) == 1


def test_rule_stack_axes_without_a_trace_equals_the_traced_plan():
  params, _, traced = _stacked_state()
  # default="none": without the trace the default would judge the stacked
  # norms (3, 8) as kernels; the rule says which leaves and their stacks.
  rules = ec2t.Selection([ec2t.Rule(r"^blocks/.*/kernel$", stack_axes=(0,))],
                         default="none")
  ruled = ec2t.ternarize_transform(gamma=0.2, selection=rules).init(params)
  jax.tree.map(np.testing.assert_array_equal, ruled.field("w_p"), traced.field("w_p"))


def test_jitted_update_of_a_stacked_state_compiles_and_checkpoints_as_a_pytree():
  params, tx, state = _stacked_state()
  leaves, treedef = jax.tree.flatten(state)
  again = jax.tree.unflatten(treedef, leaves)
  assert isinstance(again.resolved_leaves()["blocks"]["c_fc"]["kernel"], ec2t.StackedLeaf)
  jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), again, params)


# ---------------------------------------------------------------- bad input


def test_rule_stack_axes_must_be_leading_axes():
  with pytest.raises(ValueError, match=r"stack_axes must be the leading axes.*\(1,\)"):
    ec2t.Rule("kernel", stack_axes=(1,))


def test_stack_axes_out_of_range_is_an_error_naming_the_path():
  params = {"w": jnp.ones((3, 4))}
  tx = ec2t.ternarize_transform(selection=[ec2t.Rule("^w$", stack_axes=(0, 1))])
  with pytest.raises(ValueError, match=r"'w' of shape \(3, 4\).*out of range"):
    tx.init(params)


def test_stack_axis_of_length_zero_is_an_error():
  params = {"w": jnp.ones((0, 4, 4))}
  tx = ec2t.ternarize_transform(selection=[ec2t.Rule("^w$", stack_axes=(0,))])
  with pytest.raises(ValueError, match=r"'w'.*stack axis of length 0"):
    tx.init(params)


def test_rule_disagreeing_with_the_trace_is_an_error():
  _, params, order = _linen()
  sel = ec2t.Selection([ec2t.Rule(r"c_fc/kernel$", stack_axes=())], order=order)
  with pytest.raises(ValueError, match=r"blocks/c_fc/kernel.*trace shows 1 stack axes"):
    ec2t.ternarize_transform(selection=sel).init(params)


def test_rule_stacking_a_leaf_the_trace_does_not_stack_is_an_error():
  _, params, order = _linen(scan=False)
  sel = ec2t.Selection([ec2t.Rule(r"blocks_0/attn/kernel$", stack_axes=(0,))],
                       order=order)
  with pytest.raises(ValueError, match=r"blocks_0/attn/kernel.*no stack axis"):
    ec2t.ternarize_transform(selection=sel).init(params)



# --------------------------------------- same-shape leaves share one state


def _unrolled_state():
  """The unrolled GPT under EC2T with same-shape groups (``layout="grouped"``, not the
  default flat buffer)."""
  model, params, order = _linen(scan=False)
  tx = ec2t.get_method("ec2t").build(gamma=0.2, selection=ec2t.Selection(order=order))._replace(
      layout="grouped").transform()
  return model, params, tx, tx.init(params)


def test_same_shape_leaves_share_one_stacked_state():
  _, _, _, state = _unrolled_state()
  assert [g.inner.latent.shape[0] for g in state.groups] == [LAYERS] * len(BLOCK_KERNELS)
  slot = state.leaves["blocks_1"]["c_fc"]["kernel"]
  assert isinstance(slot, ec2t_core.GroupSlot)


def test_field_of_a_grouped_leaf_is_that_leaf_own_state():
  _, params, _, state = _unrolled_state()
  for i in range(LAYERS):
    np.testing.assert_array_equal(state.field("latent")[f"blocks_{i}"]["c_fc"]["kernel"],
                                  params[f"blocks_{i}"]["c_fc"]["kernel"])


def test_grouped_and_per_leaf_states_follow_the_same_trajectory():
  model, params, tx, grouped = _unrolled_state()
  per_leaf = grouped._replace(leaves=grouped.resolved_leaves(), groups=())
  params = ec2t.quantized_params(params, grouped)

  @jax.jit
  def step(params, state, tokens, targets):
    grads = jax.grad(lambda p: gpt_loss(model, p, tokens, targets))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  p_g, p_l = params, params
  for i in range(3):
    p_g, grouped = step(p_g, grouped, *token_batch(i))
    p_l, per_leaf = step(p_l, per_leaf, *token_batch(i))
  assert not per_leaf.groups and len(grouped.groups) == len(BLOCK_KERNELS)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6), p_g, p_l)
  jax.tree.map(np.testing.assert_array_equal, grouped.field("assignment"),
               per_leaf.field("assignment"))
