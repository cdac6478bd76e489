"""Old public names: each warns with its removal version and still works (``_src/deprecations.py``)."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ec2t_jax as ec2t

PARAMS = {"w": jnp.array([[0.9, -0.05, 0.3], [-0.6, 0.02, 0.1]])}
EVERYTHING = lambda path, leaf: True


def _state():
  return optax.chain(optax.sgd(0.1), ec2t.twn(selection=EVERYTHING)).init(PARAMS)


def _old(name):
  with pytest.warns(DeprecationWarning,
                    match=rf"ec2t_jax\.{name} is deprecated .* removed in ec2t_jax 0\.2\.0"):
    return getattr(ec2t, name)


def test_ternary_params_warns_and_is_quantized_params():
  old = _old("ternary_params")
  np.testing.assert_array_equal(old(PARAMS, _state())["w"],
                                ec2t.quantized_params(PARAMS, _state())["w"])


def test_ternarize_warns_and_is_the_reference_mode():
  tx = _old("ternarize")(optax.sgd(0.1), optax.sgd(0.1), optax.sgd(0.01),
                         selection=EVERYTHING)
  assert isinstance(tx.init(PARAMS), ec2t.TernarizeReferenceState)


def test_find_ternarize_state_warns_and_finds_the_quantizer_state():
  assert isinstance(_old("find_ternarize_state")(_state()), ec2t.QuantizerState)


def test_ternarize_state_warns_and_is_the_quantizer_state():
  assert _old("TernarizeState") is ec2t.QuantizerState


def test_importing_an_old_name_warns_too():
  with pytest.warns(DeprecationWarning, match="use ec2t_jax.quantized_params"):
    from ec2t_jax import ternary_params  # pylint: disable=g-import-not-at-top,unused-import


def test_an_unknown_name_is_still_an_attribute_error():
  with pytest.raises(AttributeError, match="no attribute 'nope'"):
    ec2t.nope  # pylint: disable=pointless-statement


def test_no_old_name_is_in_all():
  assert not {"ternarize", "ternary_params", "find_ternarize_state",
              "TernarizeState"} & set(ec2t.__all__)
