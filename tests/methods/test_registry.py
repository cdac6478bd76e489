"""The method registry, the grids it declares, and the protocol's one-shot and tree-level hooks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ec2t_jax as ec2t
from ec2t_jax._src import core
from ec2t_jax._src.methods._support import grids
from ec2t_jax._src.methods._support import registry
from ec2t_jax._src.methods import twn

BUILT_IN = {"ec2t": "train", "twn": "train", "ttq": "train", "sttn": "train", "faraone": "train",
            "inq": "staged", "slq": "staged", "mlq": "staged", "mcq": "one_shot",
            "prune": "one_shot"}


def test_every_built_in_method_is_registered_with_its_kind():
  found = {name: spec.kind for name, spec in ec2t.method_registry().items()}
  assert {name: found.get(name) for name in BUILT_IN} == BUILT_IN


def test_registry_filters_by_kind_and_rejects_an_unknown_kind():
  assert set(ec2t.method_registry("staged")) >= {"inq", "slq", "mlq"}
  with pytest.raises(ValueError, match="kind"):
    ec2t.method_registry("online")


def test_an_unknown_method_name_lists_the_registered_ones():
  with pytest.raises(ValueError, match="no method named 'nope'.*twn"):
    ec2t.get_method("nope")


def test_registering_a_name_twice_is_an_error_unless_replacing():
  spec = ec2t.get_method("twn")
  with pytest.raises(ValueError, match="already registered"):
    ec2t.register_method(spec)
  assert ec2t.register_method(spec, replace=True) is spec


def test_options_fill_defaults_and_name_unknown_or_bad_knobs():
  spec = ec2t.get_method("ttq")
  assert spec.options(threshold=0.1) == {"threshold": 0.1, "sparsity": None, "init_scale": 1.0,
                                         "scale_update": 1.0, "latent_step": "gradient",
                                         "scale_step": "sum"}
  with pytest.raises(ValueError, match="no knob 'gamma'"):
    spec.options(gamma=0.1)
  with pytest.raises(ValueError, match="scale_update"):
    spec.options(scale_update=-1.0)


def test_a_knobs_default_is_read_from_the_quantizers_signature():
  def quantizer(factor=0.25, *, selection=None):
    del factor, selection
  spec = registry.MethodSpec("sig", "train", quantizer, {"factor": registry.Knob()},
                             grid=lambda o: grids.ternary_grid())
  assert spec.knobs["factor"].default == 0.25


def test_a_knob_that_is_not_a_parameter_with_a_default_is_refused_at_registration():
  def quantizer(factor, *, selection=None):
    del factor, selection
  for knobs in ({"factor": registry.Knob()}, {"other": registry.Knob()}):
    with pytest.raises(ValueError, match=f"knob '{next(iter(knobs))}' is not a keyword"):
      registry.MethodSpec("sig", "train", quantizer, knobs, grid=lambda o: grids.ternary_grid())


def test_a_knob_given_a_default_value_is_a_type_error():
  with pytest.raises(TypeError, match="read from the factory's signature"):
    registry.Knob(0.7, core.Range(0.0))


def test_a_budget_knob_takes_a_budget_or_none():
  spec = ec2t.get_method("twn")
  assert spec.options(budget=ec2t.Budget(sparsity=0.5))["budget"].target == 0.5
  with pytest.raises(ValueError, match="budget must be a Budget"):
    spec.options(budget=0.5)


def test_staged_last_phase_counts_the_stages_of_every_layer():
  # MLQ: layer r starts r stages late; with L layers and S portions the last stage is L + S - 2.
  mlq = ec2t.get_method("mlq")
  assert mlq.last_phase(mlq.options(portions=(0.25, 0.5, 1.0)), 4) == 5
  inq = ec2t.get_method("inq")
  assert inq.last_phase(inq.options(), 4) == 3
  assert ec2t.get_method("faraone").last_phase({}, 4) == 1


def test_make_transform_builds_the_public_transformation():
  params = {"w": jnp.array([[0.9, -0.05, 0.3], [-0.6, 0.02, 0.1]])}
  everything = lambda path, leaf: True
  a = ec2t.get_method("twn").make_transform(selection=everything).init(params)
  b = ec2t.twn(selection=everything).init(params)
  np.testing.assert_array_equal(a.leaves["w"].assignment, b.leaves["w"].assignment)


# ------------------------------------------------------------------ grids


def test_ternary_grid_counts_values_per_layer_or_per_filter():
  two_filters = np.array([[0.5, -0.25], [0.0, 0.25], [-0.5, 0.0]])  # filter 0 {-.5,0,.5}
  assert grids.ternary_grid(per_filter=True, symmetric_filters=True).problems(
      [("w", two_filters)]) == []
  assert grids.ternary_grid().problems([("w", two_filters)]) == [
      "w has 5 distinct values, at most 3"]
  lopsided = np.array([[0.5], [-0.25], [0.0]])
  assert grids.ternary_grid(per_filter=True, symmetric_filters=True).problems(
      [("w", lopsided)]) == ["w: a filter holds magnitudes [0.25, 0.5], expected one"]


def test_power_of_two_grid_of_inq():
  grid = ec2t.get_method("inq").grid_for(bits=3)  # {0, +-2^n1, +-2^(n1-1)}: 5 values
  assert grid.max_values == 5 and not grid.ternary
  assert grid.problems([("w", np.array([0.0, 0.5, -0.25, 1.0]))]) == []
  assert grid.problems([("w", np.array([0.0, 0.75]))]) == ["w holds [0.75], not powers of two"]


def test_integer_multiples_grid_of_mcq():
  grid = ec2t.get_method("mcq").grid_for()
  assert grid.problems([("w", np.array([0.0, 0.3, -0.6, 0.9]))]) == []
  assert grid.problems([("w", np.array([0.3, 0.31]))]) == [
      "w: values are not integer multiples of one scale"]


def test_sparsity_grid_of_calibrated_pruning():
  grid = ec2t.get_method("prune").grid_for(sparsity=0.5)
  assert grid.problems([("a", np.array([0.0, 1.0])), ("b", np.array([0.0, 0.0, 2.0, 3.0]))]) == []
  with pytest.raises(AssertionError, match="pruned to 0.3333 zeros, asked for 0.5"):
    grid.check([("a", np.array([0.0, 1.0, 2.0]))])


# ------------------------------------------------------ protocol: one-shot


def test_instant_equals_twn_ternarize_on_the_selected_leaf():
  w = jnp.asarray(np.random.default_rng(0).normal(size=(4, 6)), jnp.float32)
  params = {"w": w, "b": jnp.ones(6)}
  out = twn.quantizer(selection=[ec2t.Rule("^w$")]).instant(params)
  assignment, alpha = ec2t.twn_ternarize(w, "layer")
  np.testing.assert_array_equal(np.sign(out["w"]), assignment)
  np.testing.assert_allclose(out["w"], alpha * assignment, rtol=2e-7)  # alpha snapped
  assert out["b"] is params["b"]


def test_instant_equals_ternary_params_after_init():
  params = {"w": jnp.asarray(np.random.default_rng(1).normal(size=(4, 6)), jnp.float32)}
  q = ec2t.get_method("ttq").build(selection=lambda path, leaf: True)
  out, state = q.instant(params, return_state=True)
  tx = q.transform()
  np.testing.assert_array_equal(out["w"], ec2t.quantized_params(params, tx.init(params))["w"])
  assert isinstance(state, ec2t.QuantizerState)


# ---------------------------------------------- protocol: tree-level hook


def test_mlq_ranks_come_from_the_tree_given_to_each_init():
  # The forward ranks are computed by the prepare hook of each init, not kept in a closure:
  # one transformation initialised on two trees ranks each tree's own layers.
  tx = ec2t.mlq(selection=lambda path, leaf: True)
  first = tx.init({"a": jnp.ones((2, 2)), "b": jnp.ones((2, 2))})
  second = tx.init({"c": jnp.ones((2, 2)), "d": jnp.ones((2, 2)), "e": jnp.ones((2, 2))})
  first, second = first.resolved_leaves(), second.resolved_leaves()  # same-shape leaves group
  assert [int(first[k].rank) for k in "ab"] == [0, 1]
  assert [int(second[k].rank) for k in "cde"] == [0, 1, 2]


def test_prepare_hook_reaches_init_leaf_as_ctx_info():
  seen = {}

  def prepare(params, selection, hyper):
    return core.TreeInfo(leaf_info={"w": "from the tree"})

  def init_leaf(param, ctx, hyper):
    seen[ctx.path] = ctx.info
    return twn.TWNLeaf(param, jnp.sign(param).astype(jnp.int8), jnp.ones(()))

  method = core.Method("probe", init_leaf, None, prepare=prepare)
  core.Quantizer(method, (), {}, lambda path, leaf: True).instant({"w": jnp.ones((2, 2))})
  assert seen == {"w": "from the tree"}


# --------------------------------------------------- rule options, renamed names


@pytest.mark.parametrize("make", [ec2t.inq, ec2t.slq, ec2t.mlq, ec2t.twn, ec2t.ttq, ec2t.sttn,
                                  ec2t.quantization_pruning])
def test_an_ecp_rule_with_gamma_is_rejected_at_construction_by_every_non_ec2t_method(make):
  with pytest.raises(ValueError, match=r"rule 0 \('conv'\) selects leaves with mode 'ecp'"):
    make(selection=[ec2t.Rule("conv", mode="ecp", gamma=0.3)])


def test_mcq_rejects_a_per_rule_gamma_naming_the_rule():
  with pytest.raises(ValueError, match=r"mcq has no per-rule gamma.*'w'.*gamma=0.3"):
    ec2t.mcq({"w": jnp.ones((2, 2))}, key=jax.random.key(0),
             selection=[ec2t.Rule("w", gamma=0.3)])


def test_ec2t_accepts_ecp_rules_with_their_own_gamma():
  tx = ec2t.ternarize_transform(selection=[ec2t.Rule("w", mode="ecp", gamma=0.3)])
  assert isinstance(tx.init({"w": jnp.ones((2, 2))}).leaves["w"], ec2t.ECPLeaf)


