r"""EC2T on CIFAR-10/100 with CIFAR ResNets or compound-scaled super-networks.

Pretrains in full precision (SGD + cosine, flip + pad-4 crop) or loads a
pretrained model -- e.g. the official PyTorch ResNet-20 of the EC2T paper --
then runs EC2T phase 1 and phase 2 with the paper's defaults (three Adams:
1e-4 with weight decay 5e-6 / 1e-4 / 1e-5; 20 + 15 epochs; batch 128),
evaluates every epoch, keeps the best checkpoint and prints a report.

The training step is ``jax.jit`` with explicit shardings over a ``(data, fsdp)``
mesh of all devices of all hosts: data parallel by default, ``--fsdp=N`` also
shards params and optimizer state. On several hosts (TPU pod slice, GPU
cluster) the same command runs on every host; ``jax.distributed`` is
initialised automatically where the environment says so, or explicitly::

  python examples/cifar_resnet.py --coordinator_address=host0:1234 \
      --num_processes=2 --process_id=$RANK ...

Each process reads only its own part of the data (tfds even splits).

Examples::

  # the official ResNet-20 weights (PyTorch state dict converted to .npz):
  python examples/cifar_resnet.py --init_from=../shared/data/ec2t-reference/resnet20_fp.npz
  # pretrain ResNet-56 first, then EC2T with more sparsity:
  python examples/cifar_resnet.py --model=resnet56 --fp_epochs=200 --gamma=0.3
  # the paper's C100 super-network (base ResNet-44, d=1.4, w=1.2, phi=3.5; ~8.0M params):
  python examples/cifar_resnet.py --dataset=cifar100 --model=supernet --init_scale=0.45
  # a super-network that starts with the function of a pretrained ResNet-20
  # (widened and deepened by d**phi, w**phi; no full-precision retraining):
  python examples/cifar_resnet.py --model=supernet --phi=1 \
      --init_from=../shared/data/ec2t-reference/resnet20_fp.npz
  # a smoke test without any download:
  python examples/cifar_resnet.py --mock_data=256 --model=resnet8 --fp_epochs=1 \
      --phase1_epochs=1 --phase2_epochs=1 --batch_size=32 --workdir=/tmp/smoke

Validation protocol: like the reference code, the best epoch is chosen on the
test split by default; pass ``--train_split=train[:45000] --val_split=train[45000:]``
for a held-out validation set.
"""

from __future__ import annotations

import re

from absl import app
from absl import flags

from common import flags as flags_lib
from common.cli import UserError, script_main

_MODEL_PATTERN = re.compile(r"^(resnet(\d+)|supernet)$")
DEFAULTS = {
    "workdir": "runs/cifar_resnet20",
    "dataset_default": "cifar10",
    "datasets": ("cifar10", "cifar100"),
    "train_split": "train",
    "val_split": "test",
    "test_split": "test",
    "batch_size": 128,
    "fp_epochs": 200,
    "fp_learning_rate": 0.1,
    "phase1_epochs": 20,
    "phase2_epochs": 15,
    "gamma": 0.2,
    "init_scale": 0.3,
    "augment": True,
}


def _valid_model(name: str) -> bool:
  match = _MODEL_PATTERN.match(name)
  if not match:
    return False
  return match.group(1) == "supernet" or (int(match.group(2)) - 2) % 6 == 0 < int(match.group(2)) - 2


def define_flags(fv: flags.FlagValues) -> None:
  """Defines this script's flags on ``fv``."""
  flags.DEFINE_string("model", "resnet20", "resnet20, resnet32, resnet44, resnet56 (any "
                      "resnet<6n+2>) or supernet.", flag_values=fv)
  flags.register_validator(
      "model", _valid_model,
      message="unknown model: expected resnet20, resnet32, resnet44, resnet56 (any resnet<6n+2>) "
              "or supernet", flag_values=fv)
  flags.DEFINE_float("depth_multiplier", 1.0, "resnet: blocks per stage x this (rounded up).",
                     flag_values=fv)
  flags.DEFINE_float("width_multiplier", 1.0, "resnet: channels x this (rounded to 8).",
                     flag_values=fv)
  flags.DEFINE_integer("base_depth", 44, "supernet: depth of the base ResNet.", flag_values=fv)
  flags.DEFINE_float("phi", 3.5, "supernet: compound coefficient.", flag_values=fv)
  flags.DEFINE_float("alpha", 1.4, "supernet: depth factor per unit of phi.", flag_values=fv)
  flags.DEFINE_float("beta", 1.2, "supernet: width factor per unit of phi.", flag_values=fv)
  flags.DEFINE_float("transfer_noise", 0.01, "supernet with --init_from a smaller ResNet: "
                     "relative noise that breaks the symmetry of copied channels (0: the "
                     "super-network computes exactly the pretrained function).", flag_values=fv)
  flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"], "Activation dtype "
                    "(bfloat16 on TPU); params stay float32.", flag_values=fv)
  flags.DEFINE_float("fp_weight_decay", 1e-4, "Pretraining L2 weight decay.", flag_values=fv)
  flags_lib.define_common_flags(fv, **DEFAULTS)


def build_model(fv: flags.FlagValues, num_classes: int):
  """The network named by ``--model`` and its scaling flags."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ec2t_jax import models  # pylint: disable=g-import-not-at-top
  dtype = jnp.bfloat16 if fv.compute_dtype == "bfloat16" else jnp.float32
  try:
    if fv.model == "supernet":
      return models.compound_scaled_resnet(base_depth=fv.base_depth, phi=fv.phi, alpha=fv.alpha,
                                           beta=fv.beta, num_classes=num_classes, dtype=dtype)
    return models.cifar_resnet(int(fv.model[len("resnet"):]), num_classes,
                               depth_multiplier=fv.depth_multiplier,
                               width_multiplier=fv.width_multiplier, dtype=dtype)
  except ValueError as error:
    raise UserError(str(error)) from None


def pretrained_supernet(fv: flags.FlagValues, num_classes: int, supernet):
  """``(model, init_transform)`` for ``--model=supernet --init_from=...``.

  If the checkpoint already holds ``supernet``'s architecture it is loaded as
  is (``init_transform`` None). Otherwise its network is the base: it is scaled
  by ``alpha**phi`` in depth and ``beta**phi`` in width and its weights are
  transferred so that the super-network starts with the pretrained function
  (:func:`ec2t_jax.models.scale_pretrained_resnet`).
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from common import pipeline  # pylint: disable=g-import-not-at-top
  from ec2t_jax import models  # pylint: disable=g-import-not-at-top
  params, batch_stats = pipeline.read_variables(fv.init_from)
  dtype = jnp.bfloat16 if fv.compute_dtype == "bfloat16" else jnp.float32
  try:
    base = models.cifar_resnet_from_params(params, dtype=dtype)
  except ValueError as error:
    raise UserError(f"--init_from {fv.init_from}: {error}") from None
  architecture = lambda m: (tuple(m.blocks_per_stage), tuple(m.stage_features), m.shortcut)
  if architecture(base) == architecture(supernet):
    return supernet, None
  if base.num_classes != num_classes:
    raise UserError(f"--init_from {fv.init_from} has {base.num_classes} classes, "
                    f"--dataset={fv.dataset} has {num_classes}")
  scale = dict(depth_multiplier=fv.alpha ** fv.phi, width_multiplier=fv.beta ** fv.phi,
               noise=fv.transfer_noise, key=fv.seed)
  try:
    model, _ = models.scale_pretrained_resnet(
        base, {"params": params, "batch_stats": batch_stats}, **{**scale, "noise": 0.0})
  except ValueError as error:
    raise UserError(f"--phi/--alpha/--beta/--transfer_noise: {error}") from None
  if fv.transfer_noise < 0:
    raise UserError(f"--transfer_noise must be >= 0, got {fv.transfer_noise}")

  def transfer(params, batch_stats):
    variables = models.scale_pretrained_resnet(
        base, {"params": params, "batch_stats": batch_stats}, **scale)[1]
    return variables["params"], variables["batch_stats"]

  return model, transfer


def run(fv: flags.FlagValues) -> dict:
  """Runs the job described by parsed flags ``fv``; returns the results dict."""
  import optax  # pylint: disable=g-import-not-at-top
  from common import data as data_lib  # pylint: disable=g-import-not-at-top
  from common import pipeline  # pylint: disable=g-import-not-at-top

  def fp_optimizer(total_steps: int) -> optax.GradientTransformation:
    schedule = optax.cosine_decay_schedule(fv.fp_learning_rate, total_steps)
    return optax.chain(optax.add_decayed_weights(fv.fp_weight_decay),
                       optax.sgd(schedule, momentum=0.9, nesterov=True))

  spec = data_lib.dataset_spec(fv.dataset)
  model, transfer = build_model(fv, spec.num_classes), None
  if fv.model == "supernet" and fv.init_from:
    model, transfer = pretrained_supernet(fv, spec.num_classes, model)
  config = pipeline.PipelineConfig(
      model_name=fv.model, model=model,
      fp_optimizer=fp_optimizer, init_transform=transfer, **flags_lib.pipeline_kwargs(fv))
  return pipeline.run(config)


if __name__ == "__main__":
  define_flags(flags.FLAGS)
  app.run(script_main(run))
