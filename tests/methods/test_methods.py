"""TWN, TTQ, STTN and quantization pruning as optax transformations on the shared core."""

import functools
import subprocess
import sys

import chex
from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import optax
import pytest

import ec2t_jax as ec2t
from ec2t_jax import export
from models_for_tests import batch, init, loss_fn, TERNARY_LEAVES

# case -> (registered method, its knobs); the registry gives the transformation,
# whether the grid is per filter, and the phase from which it holds.
CASES = {
    "twn_layer": ("twn", {"threshold": "layer"}),
    "twn_filter": ("twn", {"threshold": "filter"}),
    # Trained with Adam here: TTQ's Adam variant (the official defaults are momentum SGD's).
    "ttq": ("ttq", {"threshold": 0.05, "init_scale": None, "latent_step": "update",
                    "scale_step": "mean"}),
    "sttn": ("sttn", {}),
    "faraone": ("faraone", {}),
    "bitnet": ("bitnet", {}),
}


def _case(name, knobs):
  spec = ec2t.get_method(name)
  return (lambda: spec.make_transform(**knobs), spec.grid_for(**knobs).per_filter,
          spec.last_phase(spec.options(**knobs), len(TERNARY_LEAVES)))


# name -> (transformation, per_filter grid, phase set after the first step)
METHODS = {case: _case(*entry) for case, entry in CASES.items()}
STEPS = 3


def _train(make_tx, phase_after_first=0, steps=STEPS):
  model, params = init()
  tx = optax.chain(optax.adam(1e-2), make_tx())
  opt_state = tx.init(params)
  params = ec2t.quantized_params(params, opt_state)

  @jax.jit
  def step(params, opt_state, x, y):
    grads = jax.grad(lambda p: loss_fn(model, p, x, y))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for i in range(steps):
    params, opt_state = step(params, opt_state, *batch(i))
    if i == 0 and phase_after_first:
      opt_state = ec2t.set_phase(opt_state, phase_after_first)
  return params, opt_state


@functools.cache
def _trained(name):
  """Each method trained once per session, shared by the tests below."""
  make_tx, per_filter, phase = METHODS[name]
  params, opt_state = _train(make_tx, phase)
  return name, per_filter, params, opt_state


@pytest.fixture(params=sorted(METHODS))
def trained(request):
  return _trained(request.param)


def _values_per_filter(kernel, per_filter):
  kernel = np.asarray(kernel, np.float32)
  columns = kernel.reshape(-1, kernel.shape[-1]).T if per_filter else [kernel.ravel()]
  return [set(np.unique(c).tolist()) for c in columns]


def test_trained_params_hold_exactly_the_method_grid(trained):
  _, per_filter, params, _ = trained
  for name in TERNARY_LEAVES:
    for values in _values_per_filter(params[name]["kernel"], per_filter):
      assert len(values) <= 3
      nonzero = sorted(v for v in values if v != 0)
      if per_filter:  # TWN-filter and STTN: symmetric {-a, 0, a} per filter
        assert nonzero == [] or (len(nonzero) <= 2 and -nonzero[0] == nonzero[-1])
  assert len(np.unique(np.asarray(params["Conv_0"]["kernel"]))) > 3


def test_apply_updates_lands_bit_exactly_on_the_state_value(trained):
  _, _, params, opt_state = trained
  chex.assert_trees_all_equal(params, ec2t.quantized_params(params, opt_state))


def test_summary_lists_the_selected_leaves_with_the_method_name(trained):
  name, _, _, opt_state = trained
  summary = ec2t.summary(opt_state)
  assert [r.path for r in summary.layers] == [f"{n}/kernel" for n in TERNARY_LEAVES]
  expected = {"twn": "TWN", "ttq": "TTQ", "sttn": "STTN", "faraone": "Faraone",
              "bitnet": "BitNet"}
  assert summary.method == expected[name.split("_")[0]]
  assert str(summary).startswith(f"{summary.method} summary at step {STEPS}")
  assert {r.mode for r in summary.layers} == {"ternary"}


def test_summary_counts_ternary_codes_not_per_filter_values(trained):
  # Per-filter scales (TWN "filter", STTN) make many distinct values, but a
  # weight carries one of three codes: bits/weight is at most log2(3).
  _, _, _, opt_state = trained
  for row in ec2t.summary(opt_state).layers:
    assert row.levels <= 3 and row.entropy <= np.log2(3) + 1e-6


def test_export_round_trips_bitwise_and_report_reads_it(trained, tmp_path):
  name, per_filter, params, _ = trained
  path = tmp_path / f"{name}.ec2t"
  export.save(path, params)
  chex.assert_trees_all_equal(export.load(path), jax.tree.map(np.asarray, params))
  report = ec2t.report.build_report(str(path), geometry=None)
  assert report["bytes"]["file"] == path.stat().st_size
  ternary = {l["path"] for l in report["layers"] if l["ternary"]}
  if not per_filter:  # per-filter scales are stored as sparse floats, not ternary records
    assert ternary == {f"{n}/kernel" for n in TERNARY_LEAVES}


def test_export_and_report_command_lines_read_a_trained_model(tmp_path):
  _, _, params, _ = _trained("ttq")
  np.savez(tmp_path / "params.npz", **{f"{k}/{n}": v for k, leaf in params.items()
                                       for n, v in leaf.items()})
  subprocess.run([sys.executable, "-m", "ec2t_jax.export", str(tmp_path / "params.npz"),
                  str(tmp_path / "ttq.ec2t")], check=True, capture_output=True)
  out = subprocess.run([sys.executable, "-m", "ec2t_jax.report", str(tmp_path / "ttq.ec2t")],
                       check=True, capture_output=True, text=True).stdout
  assert "Conv_1/kernel" in out


# ---------------------------------------------------------------------------
# One step of each method against its formula (one selected leaf, plain SGD).

KERNEL = jnp.asarray(np.random.default_rng(0).normal(size=(4, 6)) * 0.1, jnp.float32)
GRAD = jnp.asarray(np.random.default_rng(1).normal(size=(4, 6)), jnp.float32)
ALL = lambda path, leaf: True


def _one_step(transform, lr=0.05, phase=None):
  tx = optax.chain(optax.sgd(lr), transform)
  params = {"w": KERNEL}
  state = tx.init(params)
  params = ec2t.quantized_params(params, state)
  if phase is not None:
    state = ec2t.set_phase(state, phase)
  before = ec2t.find_quantizer_state(state).leaves["w"]
  updates, state = tx.update({"w": GRAD}, state, params)
  return before, ec2t.find_quantizer_state(state).leaves["w"], optax.apply_updates(params, updates)


def test_twn_step_moves_latent_by_the_update_and_rethresholds():
  before, after, params = _one_step(ec2t.twn(selection=ALL))
  np.testing.assert_allclose(after.latent, before.latent - 0.05 * GRAD, rtol=1e-6)
  assignment, alpha = ec2t.twn_ternarize(after.latent, "layer")
  chex.assert_trees_all_equal(after.assignment, assignment)
  np.testing.assert_allclose(params["w"], alpha * assignment, rtol=1e-6)


def test_ttq_mean_scale_step_scales_latent_and_moves_scales_by_cluster_means():
  before, after, params = _one_step(ec2t.ttq(0.05, init_scale=None, scale_step="mean",
                                             selection=ALL))
  u, a = -0.05 * np.asarray(GRAD), np.asarray(before.assignment)
  s = np.where(a > 0, before.w_p, np.where(a < 0, before.w_n, 1.0))
  np.testing.assert_allclose(after.latent, np.asarray(before.latent) + s * u, rtol=1e-5)
  np.testing.assert_allclose(after.w_p, before.w_p + u[a > 0].mean(), rtol=1e-5)
  np.testing.assert_allclose(after.w_n, before.w_n - u[a < 0].mean(), rtol=1e-5)
  delta = 0.05 * np.abs(np.asarray(after.latent)).max()
  chex.assert_trees_all_equal(after.assignment, ec2t.ttq_assign(after.latent, delta))
  np.testing.assert_allclose(params["w"], np.where(
      after.assignment > 0, after.w_p, np.where(after.assignment < 0, -after.w_n, 0)), rtol=1e-6)


def test_ttq_update_latent_step_moves_latent_by_the_whole_update():
  before, after, _ = _one_step(ec2t.ttq(0.05, latent_step="update", selection=ALL))
  np.testing.assert_allclose(after.latent, np.asarray(before.latent) - 0.05 * np.asarray(GRAD),
                             rtol=1e-6)


def test_ttq_initial_scales_are_the_official_one_or_fit_each_cluster():
  official = ec2t.ttq(selection=ALL).init({"w": KERNEL}).leaves["w"]
  np.testing.assert_allclose([official.w_n, official.w_p], [1.0, 1.0])
  leaf = ec2t.ttq(init_scale=None, selection=ALL).init({"w": KERNEL}).leaves["w"]
  a, w = np.asarray(leaf.assignment), np.asarray(KERNEL)
  np.testing.assert_allclose([leaf.w_n, leaf.w_p], [-w[a < 0].mean(), w[a > 0].mean()],
                             rtol=1e-6)


def test_ttq_fixed_sparsity_keeps_the_fraction_of_zeros():
  _, after, params = _one_step(ec2t.ttq(sparsity=0.5, selection=ALL))
  assert int(np.sum(np.asarray(params["w"]) == 0)) == 12


def test_sttn_step_follows_the_straight_through_gradients_and_clamps():
  before, after, params = _one_step(
      ec2t.sttn(gradient="exact", latent_step="gradient", selection=ALL), lr=5.0)
  g1, g2 = ec2t.sttn_gradients(-5.0 * GRAD, before.latent, before.latent2)
  np.testing.assert_allclose(after.latent, np.clip(before.latent + g1, -1, 1), rtol=1e-5)
  np.testing.assert_allclose(after.latent2, np.clip(before.latent2 + g2, -1, 1), rtol=1e-5)
  assert np.abs(np.asarray(after.latent)).max() == 1.0  # the large step hit the clamp
  a, alpha = ec2t.sttn_ternarize(after.latent, after.latent2)
  np.testing.assert_allclose(params["w"], 2 * alpha * a, rtol=1e-6)


def test_sttn_exact_update_step_is_not_shrunk_by_the_scale():
  # Oracle: the straight-through term moves a latent weight inside [-1, 1] by u itself
  # (the exact gradient map moves it by alpha * u, alpha ~ 0.1 here).
  before, after, _ = _one_step(ec2t.sttn(gradient="exact", selection=ALL), lr=1e-3)
  u = -1e-3 * np.asarray(GRAD)
  s1, s2 = (np.sign(np.asarray(before.latent)), np.sign(np.asarray(before.latent2)))
  sgn = lambda w: np.where(np.asarray(w) >= 0, 1.0, -1.0)
  scale_term = (u * (sgn(before.latent) + sgn(before.latent2))).sum(0, keepdims=True) / (
      2 * u.shape[0])
  np.testing.assert_allclose(after.latent, np.asarray(before.latent) + u + s1 * scale_term,
                             rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(after.latent2, np.asarray(before.latent2) + u + s2 * scale_term,
                             rtol=1e-5, atol=1e-8)
  alpha = np.asarray(before.scale)
  assert np.all(alpha < 0.5)  # so the old map would have moved them by less than half of u


def test_quantization_pruning_passes_updates_through_before_the_switch():
  before, after, params = _one_step(ec2t.quantization_pruning(selection=ALL))
  np.testing.assert_allclose(params["w"], KERNEL - 0.05 * GRAD, rtol=1e-6)
  assert not bool(after.pruned)


def test_quantization_pruning_prunes_under_the_threshold_and_keeps_zeros_zero():
  tx = optax.chain(optax.sgd(0.05), ec2t.quantization_pruning(selection=ALL))
  params = {"w": KERNEL}
  state = ec2t.set_phase(tx.init(params), 1)
  survivors = np.abs(np.asarray(KERNEL)) > 0.7 * np.abs(np.asarray(KERNEL)).mean()
  for seed in range(3):
    grad = {"w": jnp.asarray(np.random.default_rng(seed).normal(size=(4, 6)), jnp.float32)}
    updates, state = tx.update(grad, state, params)
    params = optax.apply_updates(params, updates)
    w = np.asarray(params["w"])
    np.testing.assert_array_equal(w[~survivors], 0)
    assert len(np.unique(np.abs(w[w != 0]))) == 1  # +-alpha
  leaf = ec2t.find_quantizer_state(state).leaves["w"]
  np.testing.assert_array_equal(leaf.mask, survivors)
  np.testing.assert_allclose(np.abs(w[w != 0])[0], np.abs(leaf.latent[survivors]).mean(),
                             rtol=1e-6)


# ---------------------------------------------------------------------------
# Flax NNX, sharding, bad input.


class _Mlp(nnx.Module):

  def __init__(self, rngs):
    self.fc1 = nnx.Linear(8, 16, rngs=rngs)
    self.fc2 = nnx.Linear(16, 16, rngs=rngs)
    self.fc3 = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, x):
    return self.fc3(nnx.relu(self.fc2(nnx.relu(self.fc1(x)))))


@pytest.mark.parametrize("make_tx", [ec2t.ttq, ec2t.sttn], ids=["ttq", "sttn"])
def test_nnx_optimizer_keeps_the_model_on_the_grid(make_tx):
  model = _Mlp(nnx.Rngs(0))
  order = ec2t.Selection(order=("fc1/kernel", "fc2/kernel", "fc3/kernel"))  # forward order
  optimizer = nnx.Optimizer(model, optax.chain(optax.adam(1e-2), make_tx(selection=order)),
                            wrt=nnx.Param)
  nnx.update(model, ec2t.quantized_params(nnx.state(model, nnx.Param), optimizer))

  @nnx.jit
  def step(model, optimizer, x, y):
    loss_fn = lambda m: jnp.mean((m(x) - y) ** 2)
    optimizer.update(model, nnx.grad(loss_fn)(model))

  x = jax.random.normal(jax.random.key(0), (8, 8))
  for _ in range(2):
    step(model, optimizer, x, jnp.ones((8, 4)))
  kernel = np.asarray(model.fc2.kernel[...])
  for column in kernel.T:
    assert len(np.unique(column)) <= 3
  jax.tree.map(np.testing.assert_array_equal, nnx.as_pure(nnx.state(model, nnx.Param)),
               ec2t.quantized_params(nnx.state(model, nnx.Param), optimizer))


@pytest.mark.parametrize("make_tx", [ec2t.sttn], ids=["sttn"])  # per-filter scales, two latents
def test_sharded_jitted_steps_equal_unsharded(make_tx):
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  model, params = init()
  tx = optax.chain(optax.sgd(0.1), make_tx())  # Adam would magnify noise in tiny gradients

  def step(params, opt_state, x, y):
    grads = jax.grad(lambda p: loss_fn(model, p, x, y))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def run(params, sharded):
    if sharded:
      spec = lambda x: NamedSharding(mesh, P(*([None] * (x.ndim - 1)), "model") if (
          x.ndim >= 2 and x.shape[-1] % 4 == 0) else P())
      params = jax.tree.map(lambda x: jax.device_put(x, spec(x)), params)
    opt_state = jax.jit(tx.init)(params)
    params = jax.jit(ec2t.quantized_params)(params, opt_state)
    for i in range(2):
      x, y = batch(i)
      if sharded:
        x, y = (jax.device_put(v, NamedSharding(mesh, P("data"))) for v in (x, y))
      params, opt_state = jax.jit(step)(params, opt_state, x, y)
    return params, ec2t.find_quantizer_state(opt_state)

  params_1, state_1 = run(params, sharded=False)
  params_8, state_8 = run(params, sharded=True)
  chex.assert_trees_all_close(params_8, params_1, atol=1e-6, rtol=1e-6)
  chex.assert_trees_all_equal(state_8.field("assignment"), state_1.field("assignment"))
  chex.assert_trees_all_close(state_8.latent, state_1.latent, atol=1e-6, rtol=1e-6)
  assert params_8["Conv_1"]["kernel"].sharding.spec == P(None, None, None, "model")


@pytest.mark.parametrize("build, message", [
    (lambda: ec2t.ttq(threshold=1.5), "threshold"),
    (lambda: ec2t.ttq(threshold=-0.1), "threshold"),
    (lambda: ec2t.ttq(sparsity=1.2), "sparsity"),
    (lambda: ec2t.ttq(init_scale=0.0), "init_scale"),
    (lambda: ec2t.twn("median"), "threshold"),
    (lambda: ec2t.twn(factor=-1.0), "factor"),
    (lambda: ec2t.sttn(init_factor=0.0), "init_factor"),
    (lambda: ec2t.quantization_pruning(factor=0.0), "factor"),
])
def test_bad_hyperparameters_are_rejected_at_construction_by_name(build, message):
  with pytest.raises(ValueError, match=message):
    build()


@pytest.mark.parametrize("leaf, message", [
    (jnp.arange(6, dtype=jnp.int32).reshape(2, 3), "dtype int32"),
    (jnp.ones(()), "shape"),
])
def test_integer_and_scalar_leaves_are_rejected_at_init_by_name(leaf, message):
  with pytest.raises(ValueError, match=message):
    ec2t.twn(selection=ALL).init({"bad": leaf})


def test_a_rule_in_ecp_mode_is_rejected_at_init_by_name():
  _, params = init()
  with pytest.raises(ValueError, match="ttq.*'Conv_1/kernel'.*'ecp'"):
    ec2t.ttq(selection=[ec2t.Rule("Conv_1/kernel", mode="ecp")]).init(params)
