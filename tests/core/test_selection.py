"""Which leaves are ternarized: the paper's rule, rules and their errors."""

import jax
import jax.numpy as jnp
import optax
import pytest

import ec2t_jax as ec2t
from ec2t_jax.models import LeNet5
from models_for_tests import init


def _modes(params, selection=()):
  if callable(selection):
    selection = ec2t.Selection(default=selection)
  else:
    selection = ec2t.Selection(rules=selection)
  return {p.path: (p.mode, p.gamma) for p in selection.plan(params) if p}


def test_default_rule_skips_first_and_last_kernel():
  _, params = init()
  assert set(_modes(params)) == {"Conv_1/kernel", "Conv_2/kernel",
                                 "Dense_0/kernel"}


def test_default_rule_orders_paths_naturally():
  params = {f"layers_{i}": {"kernel": jnp.ones((3, 3))} for i in range(12)}
  assert set(_modes(params)) == {f"layers_{i}/kernel" for i in range(1, 11)}


def test_default_rule_ignores_biases_scalars_integers_and_embeddings():
  params = {"a": {"kernel": jnp.ones((2, 2))}, "b": {"kernel": jnp.ones((2, 2)),
            "bias": jnp.ones(2), "scale": jnp.ones(())},
            "c": {"embedding": jnp.ones((4, 2))}, "d": {"kernel": jnp.ones((2, 2))},
            "e": {"kernel": jnp.ones((2, 2), jnp.int32)}}
  assert set(_modes(params)) == {"b/kernel"}


def test_rules_override_the_default_first_match_wins():
  _, params = init()
  modes = _modes(params, [ec2t.Rule("Conv_1", mode="skip"),
                          ec2t.Rule("Conv_.*/kernel", mode="ecp", gamma=0.05),
                          ec2t.Rule("^Dense_1/kernel$")])
  assert modes == {"Conv_0/kernel": ("ecp", 0.05), "Conv_2/kernel": ("ecp", 0.05),
                   "Dense_0/kernel": ("ternary", None),
                   "Dense_1/kernel": ("ternary", None)}


def test_callable_default_selects_by_path_and_leaf():
  _, params = init()
  modes = _modes(params, lambda path, leaf: path.startswith("Dense"))
  assert set(modes) == {"Dense_0/kernel", "Dense_1/kernel", "Dense_0/bias",
                        "Dense_1/bias"}


def test_rule_that_selects_nothing_is_an_error():
  _, params = init()
  with pytest.raises(ValueError, match=r"Rule 0 \(pattern 'Conv_9'\) selects no"):
    ec2t.ternarize_transform(selection=[ec2t.Rule("Conv_9")]).init(params)


def test_rule_shadowed_by_an_earlier_rule_is_an_error():
  _, params = init()
  with pytest.raises(ValueError, match="Rule 1"):
    _modes(params, [ec2t.Rule("Conv"), ec2t.Rule("Conv_1")])


def test_selecting_a_non_float_leaf_is_an_error():
  params = {"a": {"kernel": jnp.ones((4, 4))}, "b": {"kernel": jnp.ones((4, 4), jnp.int32)}}
  with pytest.raises(ValueError, match="'b/kernel' of dtype int32"):
    ec2t.ternarize_transform(selection=[ec2t.Rule("kernel")]).init(params)


@pytest.mark.parametrize("shape", [(), (0, 3), (1,)])
def test_selecting_a_scalar_or_empty_leaf_is_an_error(shape):
  params = {"a": jnp.ones((4, 4)), "b": jnp.ones(shape)}
  with pytest.raises(ValueError, match=r"'b' of shape"):
    ec2t.ternarize_transform(selection=[ec2t.Rule("^[ab]$")]).init(params)


def test_nothing_selected_is_an_error():
  params = {"a": {"kernel": jnp.ones((4, 4))}, "b": {"kernel": jnp.ones((4, 4))}}
  with pytest.raises(ValueError, match="No leaf is selected"):
    ec2t.ternarize_transform().init(params)


def test_bad_rule_arguments_are_errors():
  with pytest.raises(ValueError, match="Rule.mode"):
    ec2t.Rule("x", mode="binary")
  with pytest.raises(ValueError, match="Rule.pattern"):
    ec2t.Rule("(")
  with pytest.raises(ValueError, match="Rule.gamma"):
    ec2t.Rule("x", gamma=2.0)


def test_describe_selection_lists_every_leaf_and_its_rule():
  _, params = init()
  text = ec2t.describe_selection(params, [ec2t.Rule("Dense_0/kernel", mode="ecp")])
  lines = text.splitlines()
  assert len(lines) == 1 + len(jax.tree.leaves(params))
  assert any("Dense_0/kernel" in l and "ecp" in l and "rule 0" in l for l in lines)
  assert any("Conv_1/kernel" in l and "ternary" in l and "default" in l
             for l in lines)


def test_per_rule_gamma_overrides_the_global_gamma():
  _, params = init()
  tx = optax.chain(optax.sgd(0.0), ec2t.ternarize_transform(
      gamma=0.0, selection=[ec2t.Rule("Conv_2/kernel", gamma=1.0)]))
  state = tx.init(params)
  grads = jax.tree.map(jnp.zeros_like, params)
  _, state = tx.update(grads, state, ec2t.quantized_params(params, state))
  lam = ec2t.find_quantizer_state(state).field("lam")
  assert float(lam["Conv_2"]["kernel"]) > 0
  assert float(lam["Conv_1"]["kernel"]) == 0


def test_all_but_last_ternarizes_lenet5_like_the_reference():
  params = LeNet5().init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
  plans = ec2t.Selection(default="all_but_last").plan(params)
  assert sorted(p.path for p in plans if p) == [
      "conv1/kernel", "conv2/kernel", "fc1/kernel", "fc2/kernel"]


def test_unknown_default_is_an_error():
  with pytest.raises(ValueError, match="'all_but_first'"):
    ec2t.Selection(default="all_but_first")


def test_leaf_rule_is_the_first_matching_rule():
  selection = ec2t.Selection([ec2t.Rule("^conv", mode="ecp", gamma=0.05),
                              ec2t.Rule("kernel", gamma=0.3)])
  assert selection.leaf_rule("conv2/kernel") == ec2t.LeafPlan(
      "conv2/kernel", "ecp", 0.05, "rule 0: ^conv")
  assert selection.leaf_rule("fc1/kernel") == ec2t.LeafPlan(
      "fc1/kernel", "ternary", 0.3, "rule 1: kernel")


def test_leaf_rule_without_a_match_is_the_default():
  assert ec2t.Selection([ec2t.Rule("^conv")]).leaf_rule("fc1/kernel") == ec2t.LeafPlan(
      "fc1/kernel", "ternary", None, "default")


def test_leaf_rule_agrees_with_plan_on_selected_leaves():
  _, params = init()
  selection = ec2t.Selection([ec2t.Rule("Conv_1", mode="ecp", gamma=0.1)])
  for plan in selection.plan(params):
    if plan:
      assert selection.leaf_rule(plan.path) == plan
