"""ParetoQ: forward, both gradients and the initial scale against a transcription of the
official code (facebookresearch/ParetoQ, models/utils_quant.py and train.py); the chain
form's steps against jax.grad of the official model; widths, axes, export, bad input."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ec2t_jax as ec2t
from ec2t_jax import export
from ec2t_jax._src import core
from ec2t_jax._src.methods import paretoq as paretoq_lib

ALL = lambda path, leaf: True
# Our width -> the official w_bits.
OFFICIAL_BITS = {1.58: 0, 2: 2, 3: 3, 4: 4}
WIDTHS = tuple(OFFICIAL_BITS)

# --------------------------------------------- the official formulas, transcribed
# ``xp`` is numpy or jax.numpy; weights in the official (out, in) layout, alpha (out, 1).


def official_forward(xp, weight, alpha, w_bits):
  alpha = xp.where(alpha > 1e-5, alpha, xp.float32(1e-5))
  if w_bits in (0, 2):  # StretchedElasticQuant
    clip_val = 1 - 1e-2
    n_levels, shift = (1.5, 0) if w_bits == 0 else (2 ** (w_bits - 1), 0.5)
    q_w = (xp.round(xp.clip(weight / alpha, -clip_val, clip_val) * n_levels - shift)
           + shift) / n_levels
  else:  # LsqBinaryTernaryExtension
    qn, qp = -(2 ** (w_bits - 1)), 2 ** (w_bits - 1) - 1
    q_w = xp.clip(xp.round(weight / alpha), qn, qp)
  return q_w * alpha


def official_terms(xp, weight, alpha, w_bits):
  """The official backward's pieces: in-range mask, the scale's factor d, grad_scale."""
  alpha = xp.where(alpha > 1e-5, alpha, xp.float32(1e-5))
  qp = 1 if w_bits == 0 else 2 ** (w_bits - 1) - 1
  grad_scale = 1.0 / np.sqrt(weight.size * qp)
  q_w = weight / alpha
  if w_bits in (0, 2):
    clip_val = 1 - 1e-2
    n_levels, shift = (1.5, 0) if w_bits == 0 else (2 ** (w_bits - 1), 0.5)
    qp = (n_levels - shift) / n_levels
    qn = -qp
    small, big = 1.0 * (q_w < -clip_val), 1.0 * (q_w > clip_val)
    level = (xp.round(xp.clip(q_w, -clip_val, clip_val) * n_levels - shift) + shift) / n_levels
  else:
    qn = -(2 ** (w_bits - 1))
    small, big = 1.0 * (q_w < qn), 1.0 * (q_w > qp)
    level = xp.round(q_w)
  middle = 1.0 - small - big
  return middle, small * qn + big * qp + middle * (-q_w + level), grad_scale


def official_backward(xp, grad_output, weight, alpha, w_bits, layerwise):
  middle, d, grad_scale = official_terms(xp, weight, alpha, w_bits)
  if layerwise:
    grad_alpha = xp.sum(d * grad_output * grad_scale)
  else:
    grad_alpha = xp.sum(d * grad_output * grad_scale, axis=-1, keepdims=True)
  return middle * grad_output, grad_alpha


def official_init(weight, w_bits):
  scale = np.max(np.abs(weight), axis=-1, keepdims=True)
  return scale if w_bits in (0, 2) else scale / (2 ** (w_bits - 1) - 1)


# (out, in) = (4, 6): an ordinary row, a row beyond the clip (its alpha is small), a zero
# row, a row with a value far below -alpha.
WEIGHT = np.array([[0.31, -0.12, 0.05, -0.27, 0.18, 0.02],
                   [0.9, -0.7, 0.03, 0.35, -0.11, 0.22],
                   [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                   [-2.4, 0.41, -0.08, 0.66, 0.13, -0.5]], np.float32)
ALPHA = np.array([[0.3], [0.25], [0.0], [0.8]], np.float32)
GRAD = np.random.default_rng(0).normal(size=WEIGHT.shape).astype(np.float32)
# Scales that put every row's x = W / alpha on both sides of the range for 3 and 4 bits.
ALPHA_LSQ = {3: ALPHA / 4, 4: ALPHA / 8}


def _alpha(bits):
  return ALPHA_LSQ.get(bits, ALPHA)


def test_the_test_rows_cover_both_sides_of_the_range():
  for bits in WIDTHS:
    middle, _, _ = official_terms(np, WEIGHT, _alpha(bits), OFFICIAL_BITS[bits])
    assert (middle[[0, 1, 3]] == 0).any(axis=1).all() and (middle == 1).any(), bits


# ------------------------------------------------------------------ the widths


@pytest.mark.parametrize("bits, levels", [
    (1.58, [-2 / 3, 0, 2 / 3]), (2, [-0.75, -0.25, 0.25, 0.75]),
    (3, list(range(-4, 4))), (4, list(range(-8, 8)))])
def test_each_width_has_the_official_level_set(bits, levels):
  np.testing.assert_allclose(ec2t.paretoq_levels(bits), levels, rtol=1e-12)
  ramp = np.linspace(-20.0, 20.0, 40001, dtype=np.float32)
  got = np.unique(np.asarray(ec2t.paretoq_quantize(ramp, 1.0, bits)))
  want = np.unique(official_forward(np, ramp, np.float32(1.0), OFFICIAL_BITS[bits]))
  np.testing.assert_allclose(got, levels, rtol=1e-6)
  np.testing.assert_allclose(want, levels, rtol=1e-6)


def test_codes_times_step_are_the_values():
  for bits in WIDTHS:
    codes = np.asarray(ec2t.paretoq_codes(WEIGHT, _alpha(bits), bits))
    step = np.asarray(ec2t.paretoq_step(_alpha(bits), bits))
    np.testing.assert_allclose(codes * step, ec2t.paretoq_quantize(WEIGHT, _alpha(bits), bits),
                               rtol=0)
    assert set(np.unique(codes)) <= set(paretoq_lib.width(bits).codes)


# ------------------------------------------------ forward and gradients vs official


@pytest.mark.parametrize("output_axis", [0, -1])
@pytest.mark.parametrize("bits", WIDTHS)
def test_forward_matches_the_official_formula(bits, output_axis):
  want = official_forward(np, WEIGHT, _alpha(bits), OFFICIAL_BITS[bits])
  w, a = (WEIGHT, _alpha(bits)) if output_axis == 0 else (WEIGHT.T, _alpha(bits).T)
  got = np.asarray(ec2t.paretoq_quantize(w, a, bits))
  np.testing.assert_allclose(got if output_axis == 0 else got.T, want, rtol=1e-6, atol=1e-12)


def test_a_zero_row_stays_zero_except_at_two_bits_where_it_takes_the_official_eps_level():
  for bits in WIDTHS:
    row = np.asarray(ec2t.paretoq_quantize(WEIGHT, ALPHA, bits))[2]
    want = 1e-5 / 4 if bits == 2 else 0.0  # round(-0.5) = 0, (0 + 0.5) / 2 = 1/4 of eps
    np.testing.assert_allclose(row, want, rtol=1e-6)


@pytest.mark.parametrize("layerwise", [False, True])
@pytest.mark.parametrize("output_axis", [0, -1])
@pytest.mark.parametrize("bits", WIDTHS)
def test_both_gradients_match_the_official_backward(bits, output_axis, layerwise):
  alpha = _alpha(bits)
  if layerwise:
    alpha = np.float32(0.3 if bits in (1.58, 2) else 0.3 / bits)
  want_w, want_a = official_backward(np, GRAD, WEIGHT, alpha, OFFICIAL_BITS[bits], layerwise)
  if output_axis == 0:
    got_w, got_a = ec2t.paretoq_gradients(GRAD, WEIGHT, alpha, bits, layerwise=layerwise,
                                          output_axis=0)
  else:
    a = alpha if layerwise else alpha.T
    got_w, got_a = ec2t.paretoq_gradients(GRAD.T, WEIGHT.T, a, bits, layerwise=layerwise,
                                          output_axis=-1)
    got_w, got_a = got_w.T, got_a if layerwise else got_a.T
  np.testing.assert_array_equal(got_w, want_w)
  assert np.shape(got_a) == np.shape(want_a)
  np.testing.assert_allclose(got_a, want_a, rtol=2e-6, atol=1e-7)


def test_weights_beyond_the_range_get_no_latent_gradient_and_the_clip_bound_for_the_scale():
  w = np.array([[0.995, -1.5, 0.3, 0.98]], np.float32)  # alpha 1: beyond, beyond, in, in
  g = np.ones_like(w)
  latent, scale = ec2t.paretoq_gradients(g, w, np.ones((1, 1), np.float32), output_axis=0)
  np.testing.assert_array_equal(latent, [[0, 0, 1, 1]])
  # d = Qp = 1, Qn = -1, Q(0.3) - 0.3 = -0.3, Q(0.98) - 0.98 = 2/3 - 0.98; grad_scale 1/2
  np.testing.assert_allclose(scale, [[(1 - 1 - 0.3 + 2 / 3 - 0.98) / 2]], rtol=1e-6)


@pytest.mark.parametrize("output_axis", [0, -1])
@pytest.mark.parametrize("bits", WIDTHS)
def test_initial_scale_is_the_official_train_py_one(bits, output_axis):
  want = official_init(WEIGHT, OFFICIAL_BITS[bits])
  w = WEIGHT if output_axis == 0 else WEIGHT.T
  got = np.asarray(ec2t.paretoq_init_scale(w, bits, output_axis=output_axis))
  np.testing.assert_allclose(got if output_axis == 0 else got.T, want, rtol=2.5e-7)  # 1 ulp


def test_layerwise_initial_scale_is_one_scalar_over_the_layer():
  np.testing.assert_allclose(ec2t.paretoq_init_scale(WEIGHT, layerwise=True), 2.4)
  np.testing.assert_allclose(ec2t.paretoq_init_scale(WEIGHT, 4, layerwise=True), 2.4 / 7,
                             rtol=1e-7)


# ------------------------------------------------------------ the chain form


def _chain(kernel, grad_fn, inner, steps, **knobs):
  tx = optax.chain(inner, ec2t.paretoq(**knobs, selection=ALL))
  params = {"w": jnp.asarray(kernel)}
  state = jax.jit(tx.init)(params)
  params = ec2t.quantized_params(params, state)

  @jax.jit
  def step(params, state):
    updates, state = tx.update({"w": grad_fn(params["w"])}, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state)
  return params["w"], ec2t.find_quantizer_state(state).leaves["w"]


KERNEL = jnp.asarray(np.random.default_rng(1).normal(size=(6, 5)) * 0.3, jnp.float32)  # (in, out)
X = jnp.asarray(np.random.default_rng(2).normal(size=(8, 6)), jnp.float32)
Y = jnp.asarray(np.random.default_rng(3).normal(size=(8, 5)), jnp.float32)
loss_of_weights = lambda w: jnp.sum((X @ w - Y) ** 2)


def _official_quantizer(w_bits):
  """The official autograd function on an (in, out) kernel (alpha of shape (1, out))."""

  @jax.custom_vjp
  def quantize(kernel, alpha):
    return official_forward(jnp, kernel.T, alpha.T, w_bits).T

  def fwd(kernel, alpha):
    return quantize(kernel, alpha), (kernel, alpha)

  def bwd(res, g):
    kernel, alpha = res
    gw, ga = official_backward(jnp, g.T, kernel.T, alpha.T, w_bits, False)
    return gw.T, ga.T

  quantize.defvjp(fwd, bwd)
  return quantize


@pytest.mark.parametrize("bits", WIDTHS)
def test_sgd_with_gradient_scale_steps_is_sgd_on_the_official_model(bits):
  lr, steps = 0.01, 3
  quantize = _official_quantizer(OFFICIAL_BITS[bits])
  kernel, alpha = KERNEL, jnp.asarray(official_init(np.asarray(KERNEL).T,
                                                    OFFICIAL_BITS[bits]).T)
  official_grad = jax.jit(jax.grad(lambda k, a: loss_of_weights(quantize(k, a)), argnums=(0, 1)))
  for _ in range(steps):
    gk, ga = official_grad(kernel, alpha)
    kernel, alpha = kernel - lr * gk, alpha - lr * ga
  weights, leaf = _chain(KERNEL, jax.grad(loss_of_weights), optax.sgd(lr), steps, bits=bits,
                         scale_step="gradient")
  np.testing.assert_allclose(leaf.latent, kernel, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(leaf.scale, alpha, rtol=1e-5)
  np.testing.assert_allclose(weights, quantize(kernel, alpha), rtol=1e-5, atol=1e-6)
  assert not np.allclose(alpha, official_init(np.asarray(KERNEL).T, OFFICIAL_BITS[bits]).T)


def _lsq_derivative(bits, alpha0):
  """``d`` of the official backward on the (in, out) ``KERNEL``."""
  _, d, _ = official_terms(np, np.asarray(KERNEL).T, np.asarray(alpha0).T, OFFICIAL_BITS[bits])
  return d.T


@pytest.mark.parametrize("bits", [1.58, 3])
def test_mean_scale_step_under_sgd_is_the_official_gradient_at_a_per_channel_rate(bits):
  lr, k = 0.01, 0.5
  alpha0 = paretoq_lib.paretoq_init_scale(KERNEL, bits)
  weights0 = paretoq_lib.paretoq_quantize(KERNEL, alpha0, bits)
  g = jax.grad(loss_of_weights)(weights0)
  _, ga = official_backward(np, np.asarray(g).T, np.asarray(KERNEL).T, np.asarray(alpha0).T,
                            OFFICIAL_BITS[bits], False)
  d = _lsq_derivative(bits, alpha0)
  gs = paretoq_lib.grad_scale(KERNEL.size, bits)
  rate = k * lr / (gs * np.abs(d).sum(axis=0, keepdims=True))
  _, leaf = _chain(KERNEL, jax.grad(loss_of_weights), optax.sgd(lr), 1, bits=bits,
                   scale_update=k)
  np.testing.assert_allclose(leaf.scale - alpha0, -rate * ga.T, rtol=1e-4, atol=1e-9)
  assert np.all(np.sign(leaf.scale - alpha0) == -np.sign(ga.T))


def test_mean_scale_step_under_adam_is_a_weighted_mean_of_the_inner_steps():
  lr, k = 1e-2, 0.7
  inner = optax.adam(lr)
  alpha0 = paretoq_lib.paretoq_init_scale(KERNEL)
  weights0 = paretoq_lib.paretoq_quantize(KERNEL, alpha0)
  u, _ = inner.update(jax.grad(loss_of_weights)(weights0), inner.init(weights0))
  d = _lsq_derivative(1.58, alpha0)
  _, leaf = _chain(KERNEL, jax.grad(loss_of_weights), inner, 1, scale_update=k)
  change = np.asarray(leaf.scale - alpha0)
  np.testing.assert_allclose(change, k * (d * u).sum(0, keepdims=True)
                             / np.abs(d).sum(0, keepdims=True), rtol=1e-5, atol=1e-9)
  assert np.all(np.abs(change) <= k * lr * (1 + 1e-6))  # Adam's first |u| is lr


def test_latent_weights_beyond_the_clip_do_not_move_and_the_others_take_the_update():
  alpha0 = paretoq_lib.paretoq_init_scale(KERNEL)
  inside = np.abs(np.asarray(KERNEL / alpha0)) <= paretoq_lib.CLIP
  assert (~inside).any() and inside.any()  # each column's max is beyond the clip at init
  weights0 = paretoq_lib.paretoq_quantize(KERNEL, alpha0)
  u = -0.01 * jax.grad(loss_of_weights)(weights0)
  _, leaf = _chain(KERNEL, jax.grad(loss_of_weights), optax.sgd(0.01), 1)
  np.testing.assert_allclose(leaf.latent, KERNEL + np.where(inside, u, 0.0), rtol=1e-6)


def test_output_axis_zero_gives_one_scale_per_row_as_the_transpose_does_per_column():
  method = paretoq_lib.method(2)
  hyper = paretoq_lib.ParetoQHyper()
  ctx = lambda shape, axis: core.LeafContext("w", shape, jnp.float32, "ternary", None, 1.0,
                                             output_axis=axis)
  rows = method.init_leaf(WEIGHT, ctx(WEIGHT.shape, 0), hyper)
  cols = method.init_leaf(WEIGHT.T, ctx(WEIGHT.T.shape, -1), hyper)
  assert rows.scale.shape == (4, 1) and cols.scale.shape == (1, 4)
  np.testing.assert_array_equal(rows.value(jnp.float32), cols.value(jnp.float32).T)
  rows = method.step_leaf(GRAD * 0.01, rows, ctx(WEIGHT.shape, 0), hyper, 0)
  cols = method.step_leaf(GRAD.T * 0.01, cols, ctx(WEIGHT.T.shape, -1), hyper, 0)
  np.testing.assert_allclose(rows.scale, cols.scale.T, rtol=1e-6)
  np.testing.assert_array_equal(rows.value(jnp.float32), cols.value(jnp.float32).T)


def test_layerwise_keeps_one_scalar_scale_and_one_grid_per_layer():
  weights, leaf = _chain(KERNEL, jax.grad(loss_of_weights), optax.adam(1e-2), 3, layerwise=True)
  assert leaf.scale.shape == ()
  values = np.unique(np.asarray(weights))
  assert values.size == 3 and values[0] == -values[2] and values[1] == 0


@pytest.mark.parametrize("bits", WIDTHS)
def test_training_lands_exactly_on_the_width_grid_per_channel(bits):
  weights, leaf = _chain(KERNEL, jax.grad(loss_of_weights), optax.adam(1e-2), 3, bits=bits)
  chex.assert_trees_all_equal(weights, leaf.value(jnp.float32))
  problems = paretoq_lib.grid(bits).problems([("w", np.asarray(weights))])
  assert not problems, problems
  per_column = [np.unique(np.asarray(weights)[:, j]).size for j in range(5)]
  assert max(per_column) <= len(paretoq_lib.width(bits).codes)


def test_summary_rows_name_the_width_and_count_code_levels():
  params = {"a": KERNEL, "b": KERNEL * 2}
  for bits, mode in [(1.58, "ternary"), (2, "2-bit"), (4, "4-bit")]:
    tx = optax.chain(optax.adam(1e-3), ec2t.paretoq(bits, selection=ALL))
    rows = ec2t.summary(tx.init(params)).layers
    assert [r.path for r in rows] == ["a", "b"] and {r.mode for r in rows} == {mode}
    assert all(r.levels <= len(paretoq_lib.width(bits).codes) for r in rows)
    np.testing.assert_allclose(rows[0].scale, np.mean(ec2t.paretoq_init_scale(KERNEL, bits)),
                               rtol=1e-6)
  assert "ParetoQ summary" in str(ec2t.summary(tx.init(params)))


@pytest.mark.parametrize("knobs", [dict(bits=2), dict(bits=3), dict(bits=4),
                                   dict(layerwise=True)])
def test_export_round_trips_other_widths_bitwise(knobs, tmp_path):
  params = {"a": jnp.asarray(np.random.default_rng(4).normal(size=(24, 16)), jnp.float32)}
  tx = optax.chain(optax.adam(1e-2), ec2t.paretoq(**knobs, selection=ALL))
  state = tx.init(params)
  params = ec2t.quantized_params(params, state)
  export.save(tmp_path / "m.ec2t", params)
  loaded = export.load(tmp_path / "m.ec2t")
  assert np.asarray(loaded["a"]).tobytes() == np.asarray(params["a"]).tobytes()


# ----------------------------------------------------------------- bad input


@pytest.mark.parametrize("bits", [0, 1, 1.5, 5, 8, "1.58", True, None])
def test_an_unsupported_width_is_a_value_error_naming_bits(bits):
  with pytest.raises(ValueError, match=r"bits must be one of .*got " + repr(bits)
                     .replace(".", r"\.").replace("(", r"\(")):
    ec2t.paretoq(bits)


def test_a_float32_spelling_of_the_ternary_width_is_ternary():
  assert paretoq_lib.width(np.float32(1.58)).name == "ternary"


def test_w_bits_zero_points_to_the_ternary_spelling():
  with pytest.raises(ValueError, match=r"w_bits=0 is ternary: bits=1\.58"):
    ec2t.paretoq(0)


@pytest.mark.parametrize("init_scale", [0.0, -1.0, float("nan"), float("inf")])
def test_a_non_finite_or_non_positive_initial_scale_is_a_value_error_naming_it(init_scale):
  with pytest.raises(ValueError, match=f"init_scale .*got {init_scale!r}"):
    ec2t.paretoq(init_scale=init_scale)


@pytest.mark.parametrize("layerwise", ["yes", 1, None])
def test_a_layerwise_that_is_not_a_bool_is_a_value_error_naming_it(layerwise):
  with pytest.raises(ValueError, match=f"layerwise must be True or False, got {layerwise!r}"):
    ec2t.paretoq(layerwise=layerwise)


def test_an_unknown_scale_step_is_a_value_error_naming_it():
  with pytest.raises(ValueError, match="scale_step .*'adam'"):
    ec2t.paretoq(scale_step="adam")


def test_a_one_axis_leaf_needs_layerwise_and_the_error_names_it():
  params = {"bias": jnp.ones(4)}
  with pytest.raises(ValueError, match=r"'bias' has shape \(4,\): use layerwise=True"):
    ec2t.paretoq(selection=ALL).init(params)
  ec2t.paretoq(layerwise=True, selection=ALL).init(params)


def test_an_output_axis_outside_the_leaf_is_a_value_error():
  ctx = core.LeafContext("w", (4, 6), jnp.float32, "ternary", None, 1.0, output_axis=2)
  with pytest.raises(ValueError, match="'w' of shape \\(4, 6\\) has no output_axis 2"):
    paretoq_lib.method().init_leaf(WEIGHT, ctx, paretoq_lib.ParetoQHyper())


def test_a_stacked_leaf_gets_scales_per_layer_and_output_channel():
  stacked = jnp.stack([KERNEL, 2 * KERNEL, -KERNEL])  # three (in, out) layers
  tx = ec2t.paretoq(2, selection=[ec2t.Rule("^w$", stack_axes=(0,))])
  state = tx.init({"w": stacked})
  leaf = ec2t.find_quantizer_state(state).resolved_leaves()["w"]
  assert leaf.scale.shape == (3, 1, 5)
  for i in range(3):
    np.testing.assert_allclose(leaf.scale[i], ec2t.paretoq_init_scale(stacked[i], 2), rtol=1e-7)
  np.testing.assert_allclose(ec2t.quantized_params({"w": stacked}, state)["w"][1],
                             ec2t.paretoq_quantize(stacked[1], leaf.scale[1], 2), rtol=1e-6)
  assert [r.path for r in ec2t.summary(state).layers] == ["w[0]", "w[1]", "w[2]"]
