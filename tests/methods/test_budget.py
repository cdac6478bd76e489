"""Size budgets: the controller's pure functions, EC2T trained to a size, bad input."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import ec2t_jax as ec2t
from ec2t_jax._src import core
from ec2t_jax._src.core import budget as budget_lib
from hypothesis import given, settings, strategies as st
from tests.models_for_tests import batch, init, loss_fn

# ---------------------------------------------------------------------------
# Pure functions against numpy / hand-computed oracles.


def _numpy_entropy(values):
  _, counts = np.unique(np.asarray(values).ravel(), return_counts=True)
  p = counts / counts.sum()
  return float(-(p * np.log2(p)).sum())


def test_sign_counts_count_negative_zero_positive():
  x = np.array([[-2.0, 0.0, 0.5], [0.0, 0.0, -1.0]], np.float32)
  np.testing.assert_array_equal(budget_lib.sign_counts(x), [2.0, 3.0, 1.0])


@pytest.mark.parametrize("counts", [[1, 2, 1], [0, 10, 0], [5, 0, 7], [3, 3, 3]])
def test_entropy_bits_is_numel_times_numpy_entropy(counts):
  values = np.repeat([-1, 0, 1], counts)
  expected = values.size * _numpy_entropy(values)
  np.testing.assert_allclose(budget_lib.entropy_bits(jnp.array(counts, jnp.float32)),
                             expected, rtol=1e-6, atol=1e-6)


def test_rate_and_sparsity_are_numel_weighted_over_layers():
  rng = np.random.default_rng(0)
  layers = [rng.choice([-1, 0, 1], size=n, p=p) for n, p in
            ((100, (0.1, 0.8, 0.1)), (300, (0.3, 0.4, 0.3)), (50, (0.0, 1.0, 0.0)))]
  rate, sparsity = budget_lib.rate_and_sparsity([budget_lib.sign_counts(a) for a in layers])
  numel = sum(a.size for a in layers)
  np.testing.assert_allclose(rate, sum(a.size * _numpy_entropy(a) for a in layers) / numel,
                             rtol=1e-5)
  np.testing.assert_allclose(sparsity, sum((a == 0).sum() for a in layers) / numel, rtol=1e-6)


def test_ramp_is_linear_then_flat():
  got = [float(budget_lib.ramped_target(1.5, 0.5, t, 10)) for t in (0, 5, 10, 20)]
  np.testing.assert_allclose(got, [1.5, 1.0, 0.5, 0.5], rtol=1e-6)
  assert float(budget_lib.ramped_target(1.5, 0.5, 0, 0)) == 0.5


def test_controller_step_is_clipped_dual_ascent():
  np.testing.assert_allclose(budget_lib.controller_step(0.5, 0.2, 0.5, 0.0, 1.0), 0.6, rtol=1e-6)
  assert float(budget_lib.controller_step(0.9, 1.0, 0.5, 0.0, 1.0)) == 1.0
  assert float(budget_lib.controller_step(0.1, -1.0, 0.5, 0.0, 1.0)) == 0.0


def test_size_error_is_positive_when_too_large():
  assert float(budget_lib.size_error("bits_per_weight", 0.8, 0.6)) > 0
  assert float(budget_lib.size_error("sparsity", 0.7, 0.9)) > 0  # too few zeros
  np.testing.assert_allclose(budget_lib.size_error("bytes", 1100.0, 1000.0, 8 / 9000), 0.8 / 9,
                             rtol=1e-6)


def test_bytes_and_rate_maps_are_inverse_and_affine():
  fixed, numel, rho = 5000.0, 60000, 0.9
  rate = budget_lib.bytes_to_rate(8000.0, fixed, numel, rho)
  assert rate == pytest.approx(8 * 3000 / (0.9 * 60000))
  assert budget_lib.rate_to_bytes(rate, fixed, numel, rho) == pytest.approx(8000.0)


def test_fixed_bytes_counts_headers_full_precision_and_centroids():
  got = budget_lib.fixed_bytes_bound([(10, 4), (3, 2)], [100, 50])
  expected = (budget_lib.FILE_OVERHEAD_BYTES + 4 * budget_lib.HEADER_BYTES_PER_LEAF + 46
              + 2 * budget_lib.TERNARY_STREAM_EXTRA_BYTES)
  assert got == expected


# ---------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize("kwargs, match", [
    (dict(bits_per_weight=0.0), "bits_per_weight must be finite and > 0"),
    (dict(bits_per_weight=-0.5), "bits_per_weight must be finite and > 0"),
    (dict(bits_per_weight=float("nan")), "bits_per_weight must be finite"),
    (dict(bytes=float("inf")), "bytes must be finite"),
    (dict(bits_per_weight=1.6), "at most log2"),
    (dict(sparsity=1.0), "sparsity must be below 1"),
    (dict(sparsity=0.0), "sparsity must be finite and > 0"),
    (dict(bits_per_weight=0.5, sparsity=0.9), "exactly one of .*bits_per_weight=0.5, sparsity=0.9"),
    (dict(), "exactly one of .*none"),
    (dict(sparsity=0.5, ramp_steps=-1), "ramp_steps"),
    (dict(sparsity=0.5, gain=0.0), "gain"),
    (dict(bytes=1000, coding_ratio=0.0), "coding_ratio"),
    (dict(sparsity=0.5, float16=True), "float16 .* for a bytes budget"),
    (dict(bytes=1000, float16=1), "float16 .* is a bool"),
    (dict(sparsity=0.5, fixed_bytes=100), "fixed_bytes .* for a bytes budget"),
    (dict(bytes=1000, fixed_bytes=0), "fixed_bytes must be finite and > 0"),
    (dict(bytes=1000, fixed_bytes=float("nan")), "fixed_bytes must be finite"),
])
def test_bad_budgets_are_refused_at_construction(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ec2t.Budget(**kwargs)


def test_log2_3_bits_per_weight_is_accepted():
  assert ec2t.Budget(bits_per_weight=math.log2(3)).target == math.log2(3)


def test_gamma_and_budget_together_are_refused():
  with pytest.raises(ValueError, match="gamma or budget, not both"):
    ec2t.ternarize_transform(gamma=0.3, budget=ec2t.Budget(sparsity=0.5))


def test_budget_target_without_budget_is_refused():
  with pytest.raises(ValueError, match="needs a budget"):
    ec2t.ternarize_transform(budget_target=0.5)


def test_bad_concrete_budget_target_is_refused_at_construction():
  with pytest.raises(ValueError, match="at most log2"):
    ec2t.ternarize_transform(budget=ec2t.Budget(bits_per_weight=0.5), budget_target=2.0)


def test_unreachable_bytes_budget_names_the_smallest_size_at_init():
  _, params = init()
  smallest = budget_lib.fixed_bytes_bound(
      [(p.size, 4) for k, v in params.items() for n, p in v.items()
       if not (n == "kernel" and k in ("Conv_1", "Conv_2", "Dense_0"))],
      [params[k]["kernel"].size for k in ("Conv_1", "Conv_2", "Dense_0")])
  tx = ec2t.ternarize_transform(budget=ec2t.Budget(bytes=smallest - 1))
  with pytest.raises(ValueError, match=f"unreachable.*{smallest:,} bytes"):
    tx.init(params)
  tx = ec2t.ternarize_transform(budget=ec2t.Budget(bytes=smallest))
  assert tx.init(params).budget is not None


def test_other_methods_without_a_knob_refuse_a_budget():
  from ec2t_jax._src.methods.ec2t import chain  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="does not accept a Budget"):
    core.quantize_transform(chain.method(), chain.EC2THyper(), chain.HYPER_RANGES,
                            budget=ec2t.Budget(sparsity=0.5))


# ---------------------------------------------------------------------------
# The controller on a small model.

STEPS = 100


@functools.lru_cache(maxsize=None)
def _step_fn(tx):
  """One jitted training step per transformation (compiled once per test)."""
  model, _ = init()

  @jax.jit
  def step(params, opt_state, x, y):
    grads = jax.grad(lambda p: loss_fn(model, p, x, y))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return step


def _run(tx, params, steps, opt_state=None, start=0):
  step = _step_fn(tx)
  if opt_state is None:
    opt_state = tx.init(params)
    params = ec2t.quantized_params(params, opt_state)
  for i in range(start, start + steps):
    x, y = batch(i % 4, n=32)
    params, opt_state = step(params, opt_state, x, y)
  return params, opt_state


@pytest.fixture(scope="module")
def bits_run():
  _, params = init()
  budget = ec2t.Budget(bits_per_weight=0.9, ramp_steps=30, gain=0.2)
  tx = optax.chain(optax.adam(1e-3), ec2t.ternarize_transform(budget=budget))
  return tx, params, _run(tx, params, STEPS)


def test_controller_reaches_a_bits_per_weight_budget_within_3_percent(bits_run):
  _, _, (_, opt_state) = bits_run
  summary = ec2t.summary(opt_state)
  # The reached rate, measured independently from the final assignments.
  assert summary.totals["entropy"] == pytest.approx(0.9, rel=0.03)
  assert summary.budget["reached"] == pytest.approx(summary.totals["entropy"], rel=1e-5)
  assert 0 < summary.budget["multiplier"] < 1


def test_summary_shows_target_reached_and_multiplier(bits_run):
  _, _, (_, opt_state) = bits_run
  text = str(ec2t.summary(opt_state))
  assert "budget: bits_per_weight target 0.9, reached" in text
  assert "multiplier" in text


def test_budget_holds_in_phase_2(bits_run):
  tx, _, (params, opt_state) = bits_run
  frozen = ec2t.set_phase(opt_state, 1)
  params2, opt_state2 = _run(tx, params, 10, frozen, start=STEPS)
  before, after = ec2t.find_quantizer_state(frozen), ec2t.find_quantizer_state(opt_state2)
  assert float(after.budget.multiplier) == float(before.budget.multiplier)
  chex.assert_trees_all_equal(before.field("assignment"), after.field("assignment"))
  assert float(after.budget.measured) == pytest.approx(float(before.budget.measured))


def test_controller_reaches_a_sparsity_budget_within_3_percent():
  _, params = init()
  tx = optax.chain(optax.adam(1e-3), ec2t.ternarize_transform(
      budget=ec2t.Budget(sparsity=0.8, gain=0.3)))
  _, opt_state = _run(tx, params, 60)
  assert ec2t.summary(opt_state).totals["sparsity"] == pytest.approx(0.8, rel=0.03)


@pytest.mark.slow  # a third compiled training loop (not in the default set CI runs)
def test_rule_gammas_stay_ratios_under_the_multiplier():
  # Dense_0's lambda gets half the multiplier: it ends denser than with ratio 1.
  _, params = init()
  rules = [ec2t.Rule("Conv_0", mode="skip"), ec2t.Rule("Dense_1", mode="skip"),
           ec2t.Rule("Dense_0/kernel", gamma=0.0), ec2t.Rule("kernel")]
  tx = optax.chain(optax.sgd(0.0), ec2t.ternarize_transform(
      selection=rules, budget=ec2t.Budget(sparsity=0.7, gain=0.5)))
  _, opt_state = _run(tx, params, 30)
  layers = {l.path: l for l in ec2t.summary(opt_state).layers}
  state = ec2t.find_quantizer_state(opt_state)
  assert float(state.field("lam")["Dense_0"]["kernel"]) == 0.0  # ratio 0: never constrained
  assert float(state.field("lam")["Conv_1"]["kernel"]) > 0.0
  assert layers["Conv_1/kernel"].sparsity > layers["Dense_0/kernel"].sparsity


def test_resume_mid_ramp_is_exact(tmp_path):
  _, params = init()
  tx = optax.chain(optax.adam(1e-3), ec2t.ternarize_transform(
      budget=ec2t.Budget(bits_per_weight=0.8, ramp_steps=30)))
  straight_params, straight_state = _run(tx, params, 20)
  half_params, half_state = _run(tx, params, 10)
  assert int(ec2t.find_quantizer_state(half_state).count) < 30  # mid-ramp
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "ckpt", {"params": half_params, "opt_state": half_state})
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(
        tmp_path / "ckpt", {"params": half_params, "opt_state": tx.init(params)})
  resumed_params, resumed_state = _run(tx, restored["params"], 10, restored["opt_state"],
                                       start=10)
  chex.assert_trees_all_equal(resumed_params, straight_params)
  chex.assert_trees_all_equal(ec2t.find_quantizer_state(resumed_state).budget,
                              ec2t.find_quantizer_state(straight_state).budget)


def test_traced_target_through_inject_hyperparams_and_invalid_target_skips():
  _, params = init()
  tx = optax.chain(optax.adam(1e-3), optax.inject_hyperparams(
      ec2t.ternarize_transform, static_args=("selection",))(
          budget=ec2t.Budget(bits_per_weight=0.9), budget_target=0.9))
  _, opt_state = _run(tx, params, 5)
  core_state = ec2t.find_quantizer_state(opt_state)
  assert int(core_state.invalid_hyper_count) == 0
  assert float(core_state.budget.target) == pytest.approx(0.9)
  opt_state[1].hyperparams["budget_target"] = jnp.asarray(0.5)
  new_params, new_state = _run(tx, params, 1, opt_state, start=5)
  assert float(ec2t.find_quantizer_state(new_state).budget.target) == pytest.approx(0.5)
  for bad in (float("nan"), 1.7, -0.1):
    bad_input = jax.tree.map(lambda x: x, new_state)  # a copy: hyperparams is a dict
    bad_input[1].hyperparams["budget_target"] = jnp.asarray(bad)
    _, bad_state = _run(tx, new_params, 1, bad_input, start=6)
    before, after = (ec2t.find_quantizer_state(s) for s in (new_state, bad_state))
    assert int(after.invalid_hyper_count) == int(before.invalid_hyper_count) + 1
    chex.assert_trees_all_equal(after.budget, before.budget)
    chex.assert_trees_all_equal(after.resolved_leaves(), before.resolved_leaves())


# ---------------------------------------------------------------------------
# The default is EC2T.


def test_default_ternarize_transform_is_entropy_constrained():
  _, params = init()
  tx = optax.chain(optax.sgd(0.0), ec2t.ternarize_transform())
  _, opt_state = _run(tx, params, 1)
  lam = ec2t.find_quantizer_state(opt_state).field("lam")
  assert float(lam["Conv_1"]["kernel"]) > 0  # gamma = 0 would give lambda = 0
  explicit = optax.chain(optax.sgd(0.0), ec2t.ternarize_transform(gamma=0.2))
  _, explicit_state = _run(explicit, params, 1)
  chex.assert_trees_all_equal(ec2t.find_quantizer_state(explicit_state).resolved_leaves(),
                              ec2t.find_quantizer_state(opt_state).resolved_leaves())


# ---------------------------------------------------------------------------
# Bytes: the file ec2t.export writes.


def _smallest_bytes(params, **budget) -> int:
  probe = ec2t.ternarize_transform(budget=ec2t.Budget(bytes=1e9)).init(params)
  return int(budget_lib.plan_budget(
      ec2t.Budget(bytes=1e9, **budget), chain_knob(), jax.tree.leaves(params),
      core.flat_leaf_states(probe.resolved_leaves())[0]).fixed)


def test_a_float16_bytes_budget_counts_full_precision_floats_at_two_bytes():
  _, params = init()
  full_precision = sum(p.size for k, v in params.items() for n, p in v.items()
                       if not (n == "kernel" and k in ("Conv_1", "Conv_2", "Dense_0")))
  assert (_smallest_bytes(params) - _smallest_bytes(params, float16=True)
          == 2 * full_precision)


def test_a_measured_fixed_bytes_replaces_the_models_bound():
  _, params = init()
  measured = ec2t.Budget(bytes=1e9, fixed_bytes=1234.2)
  probe = ec2t.ternarize_transform(budget=measured).init(params)
  plan = budget_lib.plan_budget(measured, chain_knob(), jax.tree.leaves(params),
                                core.flat_leaf_states(probe.resolved_leaves())[0])
  assert plan.fixed == 1235 and plan.smallest_bytes() == 1235


@pytest.mark.slow  # a third compiled training loop (not in the default set CI runs)
@pytest.mark.parametrize("float16", [False, True])
def test_bytes_budget_lands_within_5_percent_of_the_exported_file(tmp_path, float16):
  _, params = init()
  target = _smallest_bytes(params, float16=float16) + 350  # ~0.7 bits/w on 3,968 weights
  tx = optax.chain(optax.adam(1e-3), ec2t.ternarize_transform(
      budget=ec2t.Budget(bytes=target, gain=0.3, float16=float16)))
  params, opt_state = _run(tx, params, 60)
  written = ec2t.export.save(tmp_path / "model.ec2t", params, float16=float16).total_bytes
  assert written == pytest.approx(target, rel=0.05)
  assert ec2t.summary(opt_state).budget["reached"] == pytest.approx(target, rel=0.03)


def chain_knob():
  from ec2t_jax._src.methods.ec2t import chain  # pylint: disable=g-import-not-at-top
  return chain.BUDGET_CONTROLLED


# ---------------------------------------------------------------------------
# TWN: a sparsity budget through its threshold factor.


@pytest.mark.slow  # a third compiled training loop (not in the default set CI runs)
def test_twn_reaches_a_sparsity_budget_through_its_threshold():
  _, params = init()
  tx = optax.chain(optax.adam(1e-3), ec2t.twn(budget=ec2t.Budget(sparsity=0.85)))
  _, opt_state = _run(tx, params, 40)
  state = ec2t.find_quantizer_state(opt_state)
  assert ec2t.summary(opt_state).totals["sparsity"] == pytest.approx(0.85, rel=0.03)
  assert float(state.budget.multiplier) > 0.7  # the factor rose from TWN's 0.7


def test_twn_refuses_factor_with_budget_and_bytes_per_filter():
  with pytest.raises(ValueError, match="factor or budget"):
    ec2t.twn(factor=0.7, budget=ec2t.Budget(sparsity=0.5))
  with pytest.raises(ValueError, match="threshold='layer'"):
    ec2t.twn("filter", budget=ec2t.Budget(bytes=10_000))


# ---------------------------------------------------------------------------
# Stacked layers (nn.scan): each slice is a layer with its own entropy.


def _stacked_params():
  from tests.models_for_tests import TinyGPT, token_batch  # pylint: disable=g-import-not-at-top
  model = TinyGPT(layers=3, scan=True, tied=True)
  tokens, _ = token_batch()
  params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]
  order = ec2t.forward_order(lambda p, x: model.apply({"params": p}, x), params, tokens)
  return params, ec2t.Selection(order=order)


def test_rate_of_stacked_leaves_is_the_numel_weighted_mean_over_slices():
  params, selection = _stacked_params()
  state = ec2t.ternarize_transform(budget=ec2t.Budget(bits_per_weight=0.5),
                                   selection=selection).init(params)
  summary = ec2t.summary(state)
  assert any("[2]" in row.path for row in summary.layers)  # one row per slice
  np.testing.assert_allclose(float(state.budget.measured), summary.totals["entropy"],
                             rtol=1e-5)


def test_bytes_budget_refuses_stacked_leaves():
  params, selection = _stacked_params()
  tx = ec2t.ternarize_transform(budget=ec2t.Budget(bytes=1e6), selection=selection)
  with pytest.raises(ValueError, match="stacked leaf"):
    tx.init(params)


# ---------------------------------------------------------------------------
# Knob types: one error type (ValueError) naming the knob, for every knob.


@pytest.mark.parametrize("kwargs, match", [
    (dict(bits_per_weight=True), "bits_per_weight must be a real number, got True \\(bool\\)"),
    (dict(sparsity=True), "sparsity must be a real number, got True"),
    (dict(bytes=True), "bytes must be a real number, got True"),
    (dict(bytes=1000, fixed_bytes=True), "fixed_bytes must be a real number, got True"),
    (dict(sparsity=0.5, ramp_steps=True), "ramp_steps must be an integer .* got True"),
    (dict(sparsity=0.5, gain=True), "gain must be a real number, got True"),
    (dict(bytes=1000, coding_ratio=True), "coding_ratio must be a real number, got True"),
    (dict(sparsity=0.5, gain="1"), "gain must be a real number, got '1' \\(str\\)"),
    (dict(bits_per_weight="0.5"), "bits_per_weight must be a real number, got '0.5'"),
    (dict(sparsity="0.5"), "sparsity must be a real number"),
    (dict(bytes="1000"), "bytes must be a real number"),
    (dict(bytes=1000, coding_ratio="1"), "coding_ratio must be a real number"),
    (dict(bytes=1000, fixed_bytes="10"), "fixed_bytes must be a real number"),
    (dict(sparsity=0.5, ramp_steps="10"), "ramp_steps must be an integer"),
    (dict(sparsity=0.5, ramp_steps=10.0), "ramp_steps must be an integer"),
    (dict(sparsity=0.5, ramp_steps=2**31), "ramp_steps must be an integer in \\[0, 2147483647\\]"),
    (dict(sparsity=0.5, ramp_steps=np.int64(2**40)), "ramp_steps must be an integer in"),
    (dict(bits_per_weight=0.5j), "bits_per_weight must be a real number"),
    (dict(bytes=10**400), "bytes must be finite and > 0"),
    (dict(bytes=1e39), "bytes must be finite and > 0"),
    (dict(bytes=1000, fixed_bytes=10**400), "fixed_bytes must be finite and > 0"),
    (dict(sparsity=0.5, gain=[0.1]), "gain must be a real number"),
    (dict(sparsity=np.array([0.5, 0.6])), "sparsity must be a real number"),
])
def test_bools_strings_and_out_of_range_numbers_are_value_errors_naming_the_knob(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ec2t.Budget(**kwargs)


@pytest.mark.parametrize("value, hint", [(90, "for 90% pass sparsity=0.9"),
                                         (99.5, "for 99.5% pass sparsity=0.995")])
def test_a_sparsity_given_as_a_percentage_hints_at_the_fraction(value, hint):
  with pytest.raises(ValueError, match=f"fraction of zeros in \\(0, 1\\): {hint}"):
    ec2t.Budget(sparsity=value)


@pytest.mark.slow  # compiles one update
def test_the_longest_ramp_runs_through_a_jitted_update():
  _, params = init()
  tx = ec2t.ternarize_transform(budget=ec2t.Budget(sparsity=0.5, ramp_steps=2**31 - 1))
  state = tx.init(params)
  _, state = jax.jit(tx.update)(params, state, params)
  assert float(state.budget.target) < 0.5  # the ramp has barely started


_LOG2_3 = math.log2(3)
_F32_MAX = float(np.finfo(np.float32).max)


def _is_real(value) -> bool:
  return (isinstance(value, (int, float, np.integer, np.floating))
          and not isinstance(value, (bool, np.bool_)))


def _real_in(value, low, high, low_open=True) -> bool:
  if not _is_real(value):
    return False
  try:
    v = float(value)
  except OverflowError:
    return False
  return math.isfinite(v) and (v > low if low_open else v >= low) and v <= high


def _expected_valid(knob: str, value) -> bool:
  """The knobs' specification, written out (an oracle independent of budget.py)."""
  return {
      "bits_per_weight": lambda v: _real_in(v, 0, _LOG2_3),
      "sparsity": lambda v: _real_in(v, 0, math.nextafter(1.0, 0.0)),
      "bytes": lambda v: _real_in(v, 0, _F32_MAX),
      "ramp_steps": lambda v: (isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                               and 0 <= v <= 2**31 - 1),
      "gain": lambda v: v is None or _real_in(v, 0, math.inf),
      "coding_ratio": lambda v: _real_in(v, 0, 2),
      "float16": lambda v: isinstance(v, (bool, np.bool_)),
      "fixed_bytes": lambda v: v is None or _real_in(v, 0, _F32_MAX),
  }[knob](value)


_KNOB_VALUES = st.one_of(
    st.booleans(), st.none(), st.text(max_size=3),
    st.integers(-2**70, 2**70), st.integers(-3, 300),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 2),
    st.complex_numbers(max_magnitude=2), st.lists(st.floats(0, 1), max_size=2),
    st.floats(-10, 1e6).map(np.float32), st.integers(-10, 2**40).map(np.int64),
    st.booleans().map(np.bool_))


@settings(max_examples=200, deadline=None)
@given(knob=st.sampled_from(["bits_per_weight", "sparsity", "bytes", "ramp_steps", "gain",
                             "coding_ratio", "float16", "fixed_bytes"]),
       value=_KNOB_VALUES)
def test_every_knob_takes_its_valid_values_and_refuses_the_rest_with_a_value_error(knob, value):
  target = {"bits_per_weight": {}, "sparsity": {}, "bytes": {}}.get(knob, None)
  kwargs = {knob: value} if target is not None else {"bytes": 1000, knob: value}
  if _expected_valid(knob, value):
    assert getattr(ec2t.Budget(**kwargs), knob) is value
  else:
    with pytest.raises(ValueError, match=knob):
      ec2t.Budget(**kwargs)


# ---------------------------------------------------------------------------
# An unreachable target is said: the state's flag, summary, a warning, the report.


@pytest.mark.parametrize("multiplier, error, measured, goal, ramp_over, active, old, expected", [
    (1.0, 0.02, 0.977, 0.999, True, True, 3, 4),    # at the top, too large, 2% off: saturated
    (1.0, 0.005, 0.994, 0.999, True, True, 3, 0),   # at the top but within 1% of the target
    (0.9, 0.02, 0.977, 0.999, True, True, 3, 0),    # not at a bound: the controller still moves
    (0.0, -0.3, 1.2, 1.5, True, True, 7, 8),        # at the bottom, too small (bits/weight)
    (0.0, 0.3, 1.5, 1.2, True, True, 7, 0),         # at the bottom, too large: m can rise
    (1.0, 0.02, 0.977, 0.999, False, True, 3, 0),   # still ramping
    (1.0, 0.02, 0.977, 0.999, True, False, 3, 3),   # frozen or skipped: kept
    (1.0, 0.02, 0.977, 0.999, True, True, 2**30, 2**30),  # stops counting at 2^30
])
def test_saturated_steps_count_updates_pinned_at_the_bound_that_cannot_help(
    multiplier, error, measured, goal, ramp_over, active, old, expected):
  got = budget_lib.next_saturated_steps(old, multiplier, error, measured, goal, 0.0, 1.0,
                                        ramp_over, active)
  assert got.dtype == jnp.int32 and int(got) == expected


def _pinned_state(saturated: int):
  """EC2T's initial state for an unreachable sparsity, with the multiplier at its bound."""
  _, params = init()
  tx = ec2t.ternarize_transform(budget=ec2t.Budget(sparsity=0.999))
  state = tx.init(params)
  pinned = state.budget._replace(multiplier=jnp.float32(1.0),
                                 saturated_steps=jnp.int32(saturated))
  return params, state._replace(budget=pinned)


def test_an_update_pinned_at_the_bound_counts_and_the_50th_flags_the_target():
  params, state = _pinned_state(budget_lib.UNREACHABLE_AFTER_STEPS - 1)
  assert not bool(state.budget.unreachable)
  leaves = core.flat_leaf_states(state.resolved_leaves())[0]
  plan = budget_lib.plan_budget(ec2t.Budget(sparsity=0.999), chain_knob(),
                                jax.tree.leaves(params), leaves)
  new = budget_lib.update_budget_state(plan, state.budget, leaves, 0.999, 10,
                                       jnp.asarray(False), jnp.asarray(False))
  assert float(new.measured) < 0.9  # the initial assignment, far from 0.999
  assert int(new.saturated_steps) == budget_lib.UNREACHABLE_AFTER_STEPS
  assert bool(new.unreachable)
  frozen = budget_lib.update_budget_state(plan, new, leaves, 0.999, 11, jnp.asarray(True),
                                          jnp.asarray(False))
  assert int(frozen.saturated_steps) == int(new.saturated_steps)


def test_summary_says_the_target_is_not_reachable_and_warns():
  _, state = _pinned_state(budget_lib.UNREACHABLE_AFTER_STEPS + 7)
  with pytest.warns(UserWarning, match="size budget: sparsity target 0.999 not reachable: "
                                       "reached 0.[0-9]+ with the multiplier at its bound "
                                       "\\(1\\) for 57 steps"):
    summary = ec2t.summary(state)
  assert summary.budget["unreachable"] and summary.budget["saturated_steps"] == 57
  assert "budget: sparsity target 0.999 not reachable: reached" in str(summary)


@pytest.mark.slow  # a compiled training loop of 58 steps
def test_training_to_an_unreachable_sparsity_flags_it_in_the_state():
  _, params = init()
  tx = optax.chain(optax.adam(1e-3), ec2t.ternarize_transform(
      budget=ec2t.Budget(sparsity=0.999, gain=1.0)))
  _, opt_state = _run(tx, params, budget_lib.UNREACHABLE_AFTER_STEPS + 8)
  budget = ec2t.find_quantizer_state(opt_state).budget
  assert float(budget.multiplier) == 1.0  # EC2T's bound
  assert float(budget.measured) < 0.99 * 0.999
  assert int(budget.saturated_steps) >= budget_lib.UNREACHABLE_AFTER_STEPS
  assert bool(budget.unreachable)
  with pytest.warns(UserWarning, match="not reachable"):
    ec2t.summary(opt_state)


def test_a_reached_target_is_not_flagged(bits_run):
  _, _, (_, opt_state) = bits_run
  summary = ec2t.summary(opt_state)
  assert not summary.budget["unreachable"]
  assert "not reachable" not in str(summary)
