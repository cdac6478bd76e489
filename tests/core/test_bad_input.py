"""Bad arguments fail early with a message that names them."""

import re

import jax
import jax.numpy as jnp
import optax
import pytest

import ec2t_jax as ec2t
from models_for_tests import init


@pytest.mark.parametrize("gamma", [-0.1, 1.5, float("nan")])
def test_gamma_outside_unit_interval(gamma):
  with pytest.raises(ValueError, match="gamma must be in"):
    ec2t.ternarize_transform(gamma=gamma)


@pytest.mark.parametrize("init_scale", [0.0, -0.3])
def test_nonpositive_init_scale(init_scale):
  with pytest.raises(ValueError, match="init_scale must be in"):
    ec2t.ternarize_transform(init_scale=init_scale)


@pytest.mark.parametrize("name, value", [
    ("floor_factor", -1.0), ("zero_floor", 0.0), ("zero_floor", 1.5),
    ("sustain", -0.05), ("centroid_update_scale", -1.0)])
def test_other_hyperparameters_out_of_range(name, value):
  with pytest.raises(ValueError, match=f"{name} must be in"):
    ec2t.ternarize_transform(**{name: value})


def test_unknown_renormalization_and_latent_dtype():
  with pytest.raises(ValueError, match="renormalization"):
    ec2t.ternarize_transform(renormalization="fixed")
  with pytest.raises(ValueError, match="latent_dtype"):
    ec2t.ternarize_transform(latent_dtype="int8")


def test_unknown_latent_step_is_named():
  with pytest.raises(ValueError, match="latent_step.*'scaled'"):
    ec2t.ternarize_transform(latent_step="scaled")


def test_reference_mode_validates_too():
  with pytest.raises(ValueError, match="gamma must be in"):
    ec2t.reference_optimizer(gamma=2.0)
  with pytest.raises(ValueError, match="negative_centroid_sign"):
    ec2t.reference_optimizer(negative_centroid_sign="plus")


def test_update_without_params():
  _, params = init()
  tx = ec2t.ternarize_transform()
  with pytest.raises(ValueError, match="needs the current params"):
    tx.update(params, tx.init(params))
  ref = ec2t.reference_optimizer()
  with pytest.raises(ValueError, match="needs the current params"):
    ref.update(params, ref.init(params))


def test_traced_gamma_from_inject_hyperparams_is_checked_when_concrete():
  with pytest.raises(ValueError, match="gamma must be in"):
    optax.inject_hyperparams(ec2t.ternarize_transform)(gamma=3.0).init(
        {"a": jnp.ones((2, 2)), "b": jnp.ones((2, 2)), "c": jnp.ones((2, 2))})


def test_state_helpers_reject_a_state_without_ec2t():
  _, params = init()
  with pytest.raises(ValueError, match="holds 0 quantizer states"):
    ec2t.summary(optax.adam(1e-3).init(params))


# ------------------------------------------------------------------ knob types


@pytest.mark.parametrize("value", ["0.2", True, 0.2j, [0.2], jnp.array([0.1, 0.2]),
                                   jnp.array([0.2]), jnp.array(True)])
def test_a_numeric_knob_given_a_non_number_is_refused_naming_it(value):
  with pytest.raises((TypeError, ValueError), match=f"gamma must be .*{re.escape(repr(value))}"):
    ec2t.ternarize_transform(gamma=value)


def test_none_for_a_numeric_knob_without_a_default_meaning_is_refused_naming_it():
  # (gamma=None is documented: the default operating point, see "Train to a size".)
  with pytest.raises(TypeError, match="sustain must be .*None"):
    ec2t.ternarize_transform(sustain=None)


def test_a_string_knob_is_a_type_error_for_every_method():
  factories = [(ec2t.ternarize_transform, "gamma"), (ec2t.ttq, "threshold"),
               (ec2t.twn, "factor"), (ec2t.sttn, "init_factor")]
  for factory, name in factories:
    with pytest.raises(TypeError, match=f"{name} must be a real number .* got '0.5' of type str"):
      factory(**{name: "0.5"})


@pytest.mark.parametrize("value", [0.3, 1, jnp.float32(0.3), jnp.array(0.3, jnp.bfloat16)])
def test_real_numbers_and_one_element_arrays_are_accepted_as_knobs(value):
  ec2t.ternarize_transform(gamma=value)


def test_a_traced_knob_is_left_to_the_update_guard():
  params = {"a": jnp.ones((2, 2)), "b": jnp.ones((2, 2)), "c": jnp.ones((2, 2))}
  tx = optax.inject_hyperparams(ec2t.ternarize_transform)(gamma=0.2)
  state = tx.init(params)
  updates, _ = jax.jit(tx.update)(params, state, params)  # gamma is a tracer inside jit
  assert jax.tree.structure(updates) == jax.tree.structure(params)


@pytest.mark.parametrize("gamma", ["0.2", True, 0.2j])
def test_a_rule_gamma_that_is_not_a_number_is_refused(gamma):
  with pytest.raises(TypeError, match="Rule.gamma must be a real number"):
    ec2t.Rule("conv", gamma=gamma)
