"""Flax NNX: nnx.Optimizer with ternarize_transform, phase switch, summary."""

from flax import nnx
import jax
import numpy as np
import optax

import ec2t_jax as ec2t
from tests.models_for_tests import SmallNnxCNN


def _setup(gamma=0.2):
  model = SmallNnxCNN(nnx.Rngs(0))
  tx = optax.chain(optax.adam(1e-2), ec2t.ternarize_transform(gamma=gamma))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  nnx.update(model, ec2t.quantized_params(nnx.state(model, nnx.Param), optimizer))
  return model, optimizer


@nnx.jit
def _step(model, optimizer, x, y):
  def loss_fn(model):
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


def _batch(seed):
  return (jax.random.normal(jax.random.key(seed), (16, 8, 8, 1)),
          jax.random.randint(jax.random.key(seed + 1), (16,), 0, 10))


def test_default_rule_on_nnx_skips_first_and_last_layer():
  model = SmallNnxCNN(nnx.Rngs(0))
  plans = ec2t.Selection().plan(nnx.state(model, nnx.Param))
  assert {p.path for p in plans if p} == {"conv2/kernel", "fc1/kernel"}


def test_nnx_model_is_ternary_before_and_after_jitted_steps():
  model, optimizer = _setup()
  assert len(np.unique(np.asarray(model.conv2.kernel[...]))) == 3
  for i in range(3):
    loss = _step(model, optimizer, *_batch(i))
  assert np.isfinite(float(loss))
  for kernel in (model.conv2.kernel[...], model.fc1.kernel[...]):
    assert len(np.unique(np.asarray(kernel))) <= 3
  assert len(np.unique(np.asarray(model.conv1.kernel[...]))) > 3
  params = nnx.state(model, nnx.Param)
  jax.tree.map(np.testing.assert_array_equal, nnx.as_pure(params),
               ec2t.quantized_params(params, optimizer))


def test_nnx_freeze_assignment_in_place_keeps_assignment():
  model, optimizer = _setup()
  _step(model, optimizer, *_batch(0))
  ec2t.freeze_assignment(optimizer)
  assert bool(ec2t.is_frozen(optimizer))
  before = ec2t.find_quantizer_state(optimizer)
  _step(model, optimizer, *_batch(1))
  after = ec2t.find_quantizer_state(optimizer)
  np.testing.assert_array_equal(after.field("assignment")["conv2"]["kernel"],
                                before.field("assignment")["conv2"]["kernel"])
  np.testing.assert_array_equal(after.latent["fc1"]["kernel"],
                                before.latent["fc1"]["kernel"])
  assert int(after.count) == int(before.count) + 1


def test_nnx_summary_lists_the_ternary_layers():
  model, optimizer = _setup()
  _step(model, optimizer, *_batch(0))
  summary = ec2t.summary(optimizer)
  assert [l.path for l in summary.layers] == ["conv2/kernel", "fc1/kernel"]
  assert "conv2/kernel" in str(summary)
