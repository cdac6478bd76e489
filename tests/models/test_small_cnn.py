"""small_cnn_example: the fixture of the docstring examples."""

import numpy as np

import ec2t_jax as ec2t
from ec2t_jax.models import small_cnn_example


def test_selected_kernels_hold_at_most_three_values_and_the_first_layer_stays_dense():
  params = small_cnn_example().params
  for name in ("Conv_1", "Dense_0"):
    assert np.unique(np.asarray(params[name]["kernel"])).size <= 3
  assert np.unique(np.asarray(params["Conv_0"]["kernel"])).size > 3


def test_state_is_the_quantizer_state_of_opt_state():
  example = small_cnn_example()
  assert example.state.field("w_p")["Dense_1"] == {"bias": None, "kernel": None}
  found = ec2t.find_quantizer_state(example.opt_state)
  assert np.array_equal(found.field("latent")["Conv_1"]["kernel"],
                        example.state.field("latent")["Conv_1"]["kernel"])


def test_grads_are_shaped_like_params():
  example = small_cnn_example()
  assert example.grads["Dense_0"]["kernel"].shape == example.params["Dense_0"]["kernel"].shape
  assert float(example.grads["Dense_0"]["kernel"][0, 0]) == np.float32(1e-2)


def test_changing_a_returned_dict_leaves_the_next_call_alone():
  small_cnn_example().params["Conv_0"] = None
  assert small_cnn_example().params["Conv_0"] is not None
