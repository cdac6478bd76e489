"""CIFAR ResNets (He et al., 2016) and compound-scaled super-networks in Flax Linen.

The CIFAR variant: a 3x3/16 stem, three stages of basic blocks with 16, 32 and
64 channels (stride 2 between stages), global average pooling and one dense
layer; ResNet-``6n+2`` has ``n`` blocks per stage. Shortcuts default to
**option A** (parameter-free: subsample by 2 and zero-pad the new channels), as
in the EC2T reference and the official ResNet-20 weights; option B (1x1 conv +
batch norm) is available.

Module names mirror the PyTorch reference (``conv1``, ``bn1``, ``layer1_0/conv1``,
..., ``linear``) so :mod:`ec2t_jax.models.torch_convert` maps state dicts by
name, and so that the natural sort order of parameter paths puts the stem first
and the classifier last (the library's default "all but first and last" rule).

Super-networks (EC2T step one) scale depth and width EfficientNet-style:
``blocks = ceil(n * depth_multiplier)`` and ``channels = round8(c * width_multiplier)``;
:func:`compound_scaled_resnet` derives the multipliers from ``alpha**phi`` and
``beta**phi`` (the paper used base ResNet-44, alpha=1.4, beta=1.2, phi=3.5).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from ec2t_jax.models import cifar_resnet
  >>> model = cifar_resnet(20, num_classes=10)
  >>> variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  >>> sorted(variables)
  ['batch_stats', 'params']
  >>> jax.eval_shape(model.apply, variables, jnp.zeros((4, 32, 32, 3))).shape
  (4, 10)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# PyTorch's BatchNorm2d defaults (momentum 0.1 there is 1 - 0.9 here).
_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5
_CONV_INIT = nn.initializers.kaiming_normal()  # PyTorch reference: kaiming_normal_, fan_in.


def _conv3x3(features: int, strides: int, name: str, dtype: Any) -> nn.Conv:
  # Explicit (1, 1) padding matches PyTorch also for stride 2 ("SAME" would pad (0, 1)).
  return nn.Conv(features, (3, 3), strides=(strides, strides), padding=((1, 1), (1, 1)),
                 use_bias=False, kernel_init=_CONV_INIT, dtype=dtype, name=name)


def _batch_norm(train: bool, name: str, dtype: Any) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=_BN_MOMENTUM,
                      epsilon=_BN_EPSILON, dtype=dtype, name=name)


def zero_pad_shortcut(x: jax.Array, features: int, strides: int) -> jax.Array:
  """Option-A shortcut: spatial subsampling by ``strides`` and zero channel padding.

  The new channels are split evenly before and after the existing ones, as in the
  reference (``planes // 4`` on each side when the width doubles).

  Args:
    x: Activations ``[batch, H, W, C]``.
    features: Output channels (``>= C``).
    strides: Spatial stride of the block (1 or 2).

  Returns:
    ``[batch, H / strides, W / strides, features]``.
  """
  if strides > 1:
    x = x[:, ::strides, ::strides, :]
  extra = features - x.shape[-1]
  if extra < 0:
    raise ValueError(f"option-A shortcut cannot reduce channels ({x.shape[-1]} -> {features})")
  if extra:
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
  return x


class BasicBlock(nn.Module):
  """Two 3x3 conv + batch-norm layers with a residual connection.

  Attributes:
    features: Output channels.
    strides: Stride of the first convolution.
    shortcut: ``"A"`` (zero padding, parameter-free) or ``"B"`` (1x1 conv + BN)
      when the shape changes; identity otherwise.
    dtype: Computation dtype (parameters stay float32).
  """

  features: int
  strides: int = 1
  shortcut: str = "A"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = _conv3x3(self.features, self.strides, "conv1", self.dtype)(x)
    y = nn.relu(_batch_norm(train, "bn1", self.dtype)(y))
    y = _conv3x3(self.features, 1, "conv2", self.dtype)(y)
    y = _batch_norm(train, "bn2", self.dtype)(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      if self.shortcut == "A":
        x = zero_pad_shortcut(x, self.features, self.strides)
      elif self.shortcut == "B":
        x = nn.Conv(self.features, (1, 1), strides=(self.strides, self.strides),
                    use_bias=False, kernel_init=_CONV_INIT, dtype=self.dtype,
                    name="shortcut_0")(x)
        x = _batch_norm(train, "shortcut_1", self.dtype)(x)
      else:
        raise ValueError(f"unknown shortcut option {self.shortcut!r}; expected 'A' or 'B'")
    return nn.relu(y + x)


class CifarResNet(nn.Module):
  """CIFAR ResNet with configurable blocks and widths per stage.

  Attributes:
    blocks_per_stage: Number of basic blocks in each stage.
    stage_features: Channels of each stage; the stem uses the first.
    num_classes: Number of output logits.
    shortcut: ``"A"`` or ``"B"``, see :class:`BasicBlock`.
    dtype: Computation dtype, e.g. ``jnp.bfloat16`` on TPU.
  """

  blocks_per_stage: Sequence[int] = (3, 3, 3)
  stage_features: Sequence[int] = (16, 32, 64)
  num_classes: int = 10
  shortcut: str = "A"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    """Returns float32 logits ``[batch, num_classes]`` for ``[batch, H, W, 3]`` images.

    With ``train=True`` batch statistics are used and the running averages in the
    ``batch_stats`` collection are updated (pass ``mutable=["batch_stats"]``).
    """
    x = images.astype(self.dtype)
    x = _conv3x3(self.stage_features[0], 1, "conv1", self.dtype)(x)
    x = nn.relu(_batch_norm(train, "bn1", self.dtype)(x))
    for stage, (blocks, features) in enumerate(zip(self.blocks_per_stage, self.stage_features)):
      for block in range(blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(features, strides, self.shortcut, self.dtype,
                       name=f"layer{stage + 1}_{block}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, kernel_init=_CONV_INIT, dtype=self.dtype, name="linear")(x)
    return x.astype(jnp.float32)


def round_to_multiple(value: float, multiple: int = 8) -> int:
  """Rounds ``value`` to the nearest positive multiple of ``multiple`` (EfficientNet style)."""
  return max(multiple, int(round(value / multiple)) * multiple)


def cifar_resnet(depth: int, num_classes: int = 10, *, depth_multiplier: float = 1.0,
                 width_multiplier: float = 1.0, shortcut: str = "A",
                 dtype: Any = jnp.float32) -> CifarResNet:
  """Builds ResNet-``depth`` for CIFAR, optionally scaled in depth and width.

  Args:
    depth: ``6n + 2`` (20, 32, 44, 56, 110, ...).
    num_classes: 10 for CIFAR-10, 100 for CIFAR-100.
    depth_multiplier: Blocks per stage become ``ceil(n * depth_multiplier)``.
    width_multiplier: Stage widths 16/32/64 become ``round8(width * multiplier)``
      (unchanged when the multiplier is 1).
    shortcut: ``"A"`` (reference) or ``"B"``.
    dtype: Computation dtype.

  Returns:
    An uninitialised :class:`CifarResNet`.

  Example:
    >>> from ec2t_jax.models import cifar_resnet
    >>> cifar_resnet(20).blocks_per_stage
    (3, 3, 3)
  """
  if depth < 8 or (depth - 2) % 6:
    raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 44, 56...), got {depth}")
  if depth_multiplier <= 0 or width_multiplier <= 0:
    raise ValueError("depth and width multipliers must be positive")
  blocks = math.ceil((depth - 2) // 6 * depth_multiplier - 1e-9)
  widths = (16, 32, 64)
  if width_multiplier != 1.0:
    widths = tuple(round_to_multiple(w * width_multiplier) for w in widths)
  return CifarResNet(blocks_per_stage=(blocks,) * 3, stage_features=widths,
                     num_classes=num_classes, shortcut=shortcut, dtype=dtype)


def compound_scaled_resnet(base_depth: int = 44, phi: float = 3.5, alpha: float = 1.4,
                           beta: float = 1.2, num_classes: int = 100,
                           dtype: Any = jnp.float32) -> CifarResNet:
  """EC2T super-network: a CIFAR ResNet scaled by ``alpha**phi`` in depth and ``beta**phi`` in width.

  The defaults are the paper's MicroNet choice (``alpha * beta**2 ~= 2``): base
  ResNet-44, 23 blocks per stage, 32/64/120 channels, about 8.0M parameters.

  Args:
    base_depth: Depth of the base network (``6n + 2``).
    phi: Compound coefficient.
    alpha: Depth factor per unit of ``phi``.
    beta: Width factor per unit of ``phi``.
    num_classes: Number of output logits.
    dtype: Computation dtype.

  Returns:
    An uninitialised :class:`CifarResNet`.

  Example:
    >>> from ec2t_jax.models import compound_scaled_resnet
    >>> net = compound_scaled_resnet()
    >>> net.blocks_per_stage, net.stage_features
    ((23, 23, 23), (32, 64, 120))
  """
  return cifar_resnet(base_depth, num_classes, depth_multiplier=alpha ** phi,
                      width_multiplier=beta ** phi, dtype=dtype)
