"""A small CNN with a ready EC2T training state: the fixture of the docstring examples.

The examples of ``ec2t_jax`` that need a model, its parameters, gradients or
an optimizer state build them with :func:`small_cnn_example` in one line, so
each example can be pasted as it stands.

Example:
  >>> from ec2t_jax.models import small_cnn_example
  >>> params, grads = small_cnn_example()[:2]
  >>> sorted(params), params["Conv_1"]["kernel"].shape
  (['Conv_0', 'Conv_1', 'Dense_0', 'Dense_1'], (3, 3, 4, 8))
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


class SmallCNN(nn.Module):
  """Two 3x3 convolutions (4 and 8 channels), a global mean, ``Dense(16)``, ``Dense(num_classes)``.

  Under the paper's default selection ``Conv_0`` (the first layer) and
  ``Dense_1`` (the last) stay full precision; ``Conv_1`` and ``Dense_0`` are
  ternarized.
  """
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    x = nn.relu(nn.Conv(8, (3, 3))(x)).mean((1, 2))
    x = nn.relu(nn.Dense(16)(x))
    return nn.Dense(self.num_classes)(x)


class SmallCNNExample(NamedTuple):
  """What :func:`small_cnn_example` returns (unpack a prefix: ``params, grads = ...[:2]``).

  Attributes:
    params: the :class:`SmallCNN`'s params, the selected leaves already on
      their ternary values (``ec2t.quantized_params(params, opt_state)``).
    grads: ``0.01`` everywhere, shaped like ``params``.
    tx: ``optax.chain(optax.adam(1e-3), ec2t.ternarize_transform(gamma=0.2))``.
    opt_state: ``tx.init(params)``.
    state: the chain's :class:`~ec2t_jax.QuantizerState`
      (``ec2t.find_quantizer_state(opt_state)``).
    model: the :class:`SmallCNN` (10 classes).
    x: its example input, ``jnp.ones((2, 8, 8, 1))``.
  """
  params: Any
  grads: Any
  tx: optax.GradientTransformation
  opt_state: Any
  state: Any
  model: nn.Module
  x: jax.Array


def small_cnn_example() -> SmallCNNExample:
  """A fixture for examples: a small CNN, its params and gradients, and an EC2T chain's state.

  Built once per process (the key is fixed, so every call returns the same
  values); each call returns fresh containers, so changing a returned dict
  does not change the next call's.

  Returns:
    A :class:`SmallCNNExample` ``(params, grads, tx, opt_state, state, model, x)``.

  Example:
    >>> from ec2t_jax.models import small_cnn_example
    >>> opt_state = small_cnn_example().opt_state
    >>> import ec2t_jax as ec2t
    >>> ec2t.find_quantizer_state(opt_state).field("w_p")["Dense_1"]  # the last layer
    {'bias': None, 'kernel': None}
  """
  return jax.tree.map(lambda leaf: leaf, _build())


@functools.cache
def _build() -> SmallCNNExample:
  # Imported here: the reference models themselves do not need the library.
  import ec2t_jax as ec2t  # pylint: disable=g-import-not-at-top

  model = SmallCNN()
  x = jnp.ones((2, 8, 8, 1))
  params = model.init(jax.random.key(0), x)["params"]
  tx = optax.chain(optax.adam(1e-3), ec2t.ternarize_transform(gamma=0.2))
  opt_state = tx.init(params)
  params = ec2t.quantized_params(params, opt_state)
  grads = jax.tree.map(lambda p: 1e-2 * jnp.ones_like(p), params)
  return SmallCNNExample(params, grads, tx, opt_state, ec2t.find_quantizer_state(opt_state),
                         model, x)
