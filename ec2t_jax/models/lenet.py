"""LeNet models for MNIST in Flax Linen.

Two classic MNIST baselines used by the EC2T examples and benchmarks:

* :class:`LeNet5` -- two 5x5 convolutions with 2x2 max-pooling followed by three
  dense layers (LeCun et al., 1998: 6C5-MP2-16C5-MP2-120-84-10 by default).
* :class:`LeNet300100` -- the fully connected 784-300-100-10 network.

Module names (``conv1``, ``conv2``, ``fc1``, ...) sort naturally in forward
order, so the library's default selection rule (ternarize every kernel except
the first and the last) picks the hidden layers. The reference code's LeNet-5
runs ternarize conv1 to fc2 and keep only the output layer in full precision:
``ec2t.Selection(default="all_but_last")``.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from ec2t_jax.models import LeNet5
  >>> model = LeNet5(num_classes=10)
  >>> variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  >>> model.apply(variables, jnp.zeros((2, 28, 28, 1))).shape
  (2, 10)
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class LeNet5(nn.Module):
  """LeNet-5: two convolutions and three dense layers.

  Attributes:
    num_classes: Number of output logits.
    conv_features: Output channels of ``conv1`` and ``conv2``.
    dense_features: Widths of the hidden dense layers ``fc1`` and ``fc2``.
  """

  num_classes: int = 10
  conv_features: Sequence[int] = (6, 16)
  dense_features: Sequence[int] = (120, 84)

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    """Returns logits of shape ``[batch, num_classes]`` for ``[batch, H, W, C]`` images.

    ``train`` is accepted for interface parity with the ResNets (LeNet has no
    batch norm or dropout, so it changes nothing).
    """
    del train
    x = images
    # conv1 keeps the 28x28 resolution (the original LeNet-5 read 32x32 padded digits).
    x = nn.Conv(self.conv_features[0], (5, 5), padding="SAME", name="conv1")(x)
    x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
    x = nn.Conv(self.conv_features[1], (5, 5), padding="VALID", name="conv2")(x)
    x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    for index, width in enumerate(self.dense_features, start=1):
      x = nn.relu(nn.Dense(width, name=f"fc{index}")(x))
    return nn.Dense(self.num_classes, name=f"fc{len(self.dense_features) + 1}")(x)


class LeNet300100(nn.Module):
  """The fully connected LeNet-300-100 (784-300-100-10).

  Attributes:
    num_classes: Number of output logits.
    hidden_features: Widths of the hidden layers ``fc1`` and ``fc2``.
  """

  num_classes: int = 10
  hidden_features: Sequence[int] = (300, 100)

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    """Returns logits of shape ``[batch, num_classes]``; images are flattened."""
    del train
    x = images.reshape((images.shape[0], -1)).astype(jnp.float32)
    for index, width in enumerate(self.hidden_features, start=1):
      x = nn.relu(nn.Dense(width, name=f"fc{index}")(x))
    return nn.Dense(self.num_classes, name=f"fc{len(self.hidden_features) + 1}")(x)
