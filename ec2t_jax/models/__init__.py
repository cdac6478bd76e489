"""Reference models for the EC2T examples: LeNets for MNIST, CIFAR ResNets, a GPT, PyTorch import.

:func:`small_cnn_example` is the fixture of the docstring examples (a small CNN,
its params, gradients and an EC2T chain's state).

Example:
  >>> from ec2t_jax import models
  >>> net = models.get_model("resnet20", num_classes=10)
  >>> type(net).__name__
  'CifarResNet'
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from ec2t_jax.models import gpt_decode
from ec2t_jax.models.gpt import GPT, GPTConfig, unstack_blocks
from ec2t_jax.models.lenet import LeNet300100, LeNet5
from ec2t_jax.models.resnet import (BasicBlock, CifarResNet, cifar_resnet, compound_scaled_resnet,
                                    zero_pad_shortcut)
from ec2t_jax.models.small_cnn import SmallCNN, SmallCNNExample, small_cnn_example
from ec2t_jax.models.supernet import (cifar_resnet_from_params, scale_pretrained_resnet,
                                      transfer_to_supernet)
from ec2t_jax.models.torch_convert import (CheckpointMismatchError, convert_state_dict,
                                           load_state_dict, load_torch_checkpoint, to_state_dict)

MODEL_NAMES = ("lenet5", "lenet300100", "resnet20", "resnet32", "resnet44", "resnet56",
               "supernet")


def get_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
  """Builds a model by name.

  Args:
    name: One of :data:`MODEL_NAMES`. ``"supernet"`` is
      :func:`compound_scaled_resnet` (kwargs: ``base_depth``, ``phi``, ``alpha``,
      ``beta``); ``"resnetN"`` accepts ``depth_multiplier`` and ``width_multiplier``.
    num_classes: Number of output logits.
    **kwargs: Forwarded to the model factory.

  Returns:
    An uninitialised Flax module.

  Raises:
    ValueError: for an unknown name, listing the known ones.
  """
  if name == "lenet5":
    return LeNet5(num_classes=num_classes, **kwargs)
  if name == "lenet300100":
    return LeNet300100(num_classes=num_classes, **kwargs)
  if name == "supernet":
    return compound_scaled_resnet(num_classes=num_classes, **kwargs)
  if name.startswith("resnet") and name[len("resnet"):].isdigit():
    return cifar_resnet(int(name[len("resnet"):]), num_classes, **kwargs)
  raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}")


__all__ = [
    "BasicBlock", "CheckpointMismatchError", "CifarResNet", "GPT", "GPTConfig", "LeNet300100", "LeNet5",
    "MODEL_NAMES", "cifar_resnet", "gpt_decode", "cifar_resnet_from_params", "compound_scaled_resnet",
    "convert_state_dict", "get_model", "load_state_dict", "load_torch_checkpoint",
    "scale_pretrained_resnet", "to_state_dict", "transfer_to_supernet", "unstack_blocks",
    "zero_pad_shortcut",
    # The fixture of the docstring examples.
    "SmallCNN", "SmallCNNExample", "small_cnn_example",
]
